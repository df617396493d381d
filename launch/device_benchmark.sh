#!/usr/bin/env bash
# The whole speed measurement on one accelerator host, in one go, from a source checkout: the
# training step of CoCa in open_clip's coca_ViT-B-32 shapes and of SyCoCa-B/16, at the batch
# sizes and attention kernels that matter, each variant compiled once, printed as JSON lines.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/device_benchmark.sh [--prepare] [--budget_s=S] [--steps=N] [--out=FILE] [--trace]
                                  [--bench=PRESET@SWEEP ...]

Run from the checkout's root on a machine with an accelerator and a bare JAX (jax, flax, optax,
orbax, absl, numpy; no grain, tfds, sentencepiece, tensorboardX, pycocoevalcap: the benchmark
imports none of them). It puts the checkout on PYTHONPATH, installs the wheels in .whl/ (what
the host lacks, e.g. ml_collections) into a temporary folder if they are not importable, sources
launch/xla_gpu.env on GPUs (XLA's GPU performance flags; one this jaxlib does not know is
dropped with a note), prints a host line (jax, devices, XLA_FLAGS, and the bf16 matmul rate and
copy bandwidth measured on random data), then runs python -m sycoca_jax.tools.benchmark once
per model (several compiled variants each), most important first, one JSON line per variant:

  1. configs/benchmark.py:openclip_b32 (CoCa, open_clip's coca_ViT-B-32 shapes), bf16, batch
     256: attention_impl=auto (cuDNN flash attention where it applies) and cudnn (everywhere,
     odd lengths padded), each with the scanned layer stacks run with no loop (the preset,
     model.scan_unroll=0) and as a loop (1), and the cuDNN step with the caption loss unchunked
     (loss.caption_chunk_len=0: tools.compile_for_gpu predicts it moves 71 % fewer bytes than
     the loop with auto);
  2. configs/benchmark.py:b16 (SyCoCa-B/16), bf16, batch 256, attention auto;
  3. configs/benchmark.py:b16,objective=coca: the same (the SyCoCa/CoCa step-time ratio);
  4. b16 with attention cudnn, with the preset's remat (dots_attention_gelu) and with dots
     (whose backward re-runs the attention kernels and the GELU); openclip_b32 with unrolled
     parameters (model.scan=false: the same bytes as no loop, 2,400 more kernels, one
     optimiser update per layer's array); openclip_b32 and b16 at batch 128.

Variants left when the time budget is spent are printed as skipped. About 7 minutes on one
H100/H200 (compiles dominate; unrolled layers compile longer).

Options:
  --prepare      on a machine with pip and a registry (not the accelerator host): download the
                 wheels a bare host lacks into .whl/ and print what to carry (.whl)
  --budget_s=S   stop starting new variants after S seconds in all (default 360; a
                 variant started by then still finishes)
  --steps=N      timed steps per variant (default 10, after 2 warm-up steps)
  --bench=PRESET@SWEEP
                 measure these instead of the list above (repeatable, in order), e.g.
                 --bench='b16@batch_size=256;model.remat=dots,full'
  --trace        also trace two steps of each variant and add where their device time went
                 (tools.trace_summary: busy time, kernel time by kind, top kernels) to its line
  --out=FILE     also append the JSON lines to FILE (default: $OUT/benchmark.jsonl when OUT is
                 set)
  -h, --help     print this help
EOF
}

die() {
  echo "device_benchmark: $*" >&2
  exit 2
}

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
prepare=0 budget=360 steps=10 out="" trace="" points=()
[[ -n ${OUT:-} ]] && out="$OUT/benchmark.jsonl"
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h | --help)
      usage
      exit 0
      ;;
    --prepare) prepare=1 ;;
    --budget_s=*) budget=${1#*=} ;;
    --steps=*) steps=${1#*=} ;;
    --out=*) out=${1#*=} ;;
    --bench=*@*) points+=("${1#*=}") ;;
    --trace) trace=$(mktemp -d "${TMPDIR:-/tmp}/sycoca_trace.XXXXXX") ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done
[[ $budget =~ ^[0-9]+$ ]] || die "--budget_s must be a whole number of seconds"
[[ $steps =~ ^[1-9][0-9]*$ ]] || die "--steps must be a positive integer"
python=${PYTHON:-python3}

if [[ $prepare -eq 1 ]]; then
  # The accelerator image runs Python 3.12; ml_collections is pure Python (and needs only
  # absl-py and PyYAML, which the image has).
  mkdir -p "$repo_root/.whl"
  "$python" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    -d "$repo_root/.whl" "ml_collections==1.1.0"
  echo "device_benchmark: carry .whl (ignored by git) with the checkout, then run" \
    "launch/device_benchmark.sh there"
  exit 0
fi

cd "$repo_root"
export PYTHONPATH="$repo_root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if ! "$python" -c "import ml_collections" 2>/dev/null; then
  shopt -s nullglob
  wheels=("$repo_root"/.whl/*.whl)
  [[ ${#wheels[@]} -gt 0 ]] ||
    die "ml_collections is missing and .whl/ holds no wheels: run --prepare where pip works"
  site=$(mktemp -d "${TMPDIR:-/tmp}/sycoca_site.XXXXXX")
  "$python" -m pip install -q --no-index --no-deps --no-compile --target "$site" "${wheels[@]}"
  export PYTHONPATH="$PYTHONPATH:$site"
fi
if command -v nvidia-smi >/dev/null 2>&1; then
  # shellcheck disable=SC1091  # checked on its own (tests/test_perf_launch.py)
  source "$repo_root/launch/xla_gpu.env"
fi
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-${TMPDIR:-/tmp}/sycoca_jax_compilation_cache}

emit() { # one JSON line to stdout (and to --out)
  echo "$1"
  if [[ -n $out ]]; then echo "$1" >>"$out"; fi
}
host_line() { # jax, the devices, XLA_FLAGS and the measured bf16 matmul rate and bandwidth
  "$python" -c 'import json, os, jax
from sycoca_jax.tools.benchmark import measured_ceilings
print(json.dumps({"host": {"jax": jax.__version__, "devices": [d.device_kind for d in jax.devices()], "xla_flags": os.environ.get("XLA_FLAGS", ""), "ceilings": measured_ceilings()}}))'
}
# A flag this jaxlib does not know aborts XLA at start-up: drop the ones it names and go on.
host_err=$(mktemp "${TMPDIR:-/tmp}/sycoca_host.XXXXXX")
if ! line=$(host_line 2>"$host_err"); then
  unknown=$(grep -o -- '--xla_[a-z0-9_]*' "$host_err" | sort -u || true)
  [[ -n $unknown ]] || { cat "$host_err" >&2; die "JAX could not start (above)"; }
  for flag in $unknown; do
    XLA_FLAGS=$(echo " $XLA_FLAGS " | sed -E "s/ ${flag}(=[^ ]*)? / /g; s/^ +//; s/ +$//")
    echo "device_benchmark: this jaxlib lacks $flag; running without it" >&2
  done
  if [[ -n $XLA_FLAGS ]]; then export XLA_FLAGS; else unset XLA_FLAGS; fi
  line=$(host_line)
fi
rm -f "$host_err"
emit "$line"

start=$SECONDS
status=0
bench() { # $1: config spec, $2: sweep
  local left=$((budget - (SECONDS - start)))
  if [[ $left -le 0 ]]; then
    emit "{\"config\": \"$1\", \"sweep\": \"$2\", \"skipped\": \"over the time budget\"}"
    return
  fi
  local line
  set +e
  "$python" -m sycoca_jax.tools.benchmark "--config=configs/benchmark.py:$1" "--sweep=$2" \
    "--steps=$steps" --warmup=2 "--time_budget_s=$left" ${trace:+"--trace_dir=$trace/$1"} | while IFS= read -r line; do
    emit "${line%\}}, \"config\": \"$1\"}"
  done
  local rc=${PIPESTATUS[0]}
  set -e
  [[ $rc -eq 0 ]] || status=1
}
if [[ ${#points[@]} -gt 0 ]]; then
  for point in "${points[@]}"; do bench "${point%%@*}" "${point#*@}"; done
  exit "$status"
fi
# Most important first: a budget cut keeps the targets' own points.
bench openclip_b32 'batch_size=256;model.attention_impl=auto,cudnn;model.scan_unroll=0,1'
bench openclip_b32 'batch_size=256;model.attention_impl=cudnn;loss.caption_chunk_len=0'
bench b16 'batch_size=256;model.attention_impl=auto'
bench b16,objective=coca 'batch_size=256;model.attention_impl=auto'
bench b16 'batch_size=256;model.attention_impl=cudnn;model.remat=dots_attention_gelu,dots'
bench openclip_b32 'batch_size=256;model.attention_impl=auto;model.scan=false'
bench openclip_b32 'batch_size=128;model.attention_impl=auto'
bench b16 'batch_size=128;model.attention_impl=auto'
exit "$status"
