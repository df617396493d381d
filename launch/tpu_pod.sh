#!/usr/bin/env bash
# Train on a Cloud TPU slice: create (or reuse) the TPU VM or queued resource, install this
# checkout on every worker, and run the same training command on all of them (--worker=all).
# The workers find each other by themselves (jax.distributed auto-detection on Cloud TPU); the
# workdir lives on GCS so every worker sees the same checkpoints.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh --name=NAME --zone=ZONE --accelerator=TYPE --workdir=gs://BUCKET/RUN \
           [options] [--] TRAINING_FLAGS...

Creates the TPU VM NAME (or reuses it if it exists), copies this checkout to every worker,
installs it with its [tpu,gcs] extras in ~/sycoca_venv, then runs on all workers:

  python -m sycoca_jax.main --distributed=on --workdir=WORKDIR --flagfile=RECIPE TRAINING_FLAGS...

Required:
  --name=NAME            TPU VM (and queued resource) name
  --zone=ZONE            e.g. us-east5-a
  --accelerator=TYPE     e.g. v4-32, v5litepod-64, v5p-128, v6e-256
  --workdir=gs://...     checkpoints and metrics; must be on GCS (all workers write to it)

Options:
  --project=ID           gcloud project (default: gcloud's configured one)
  --runtime=VERSION      TPU software version (default by generation: v4 tpu-ubuntu2204-base,
                         v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e)
  --queued               request the slice as a queued resource and wait until it is ACTIVE
  --spot                 spot (preemptible) capacity; rerun this script to resume after a
                         preemption (the run continues from the workdir's last checkpoint)
  --recipe=FILE          flagfile of --config. overrides (default: launch/recipes/<type>.flags
                         when it exists, e.g. launch/recipes/v5p-128.flags)
  --config=SPEC          config (default: configs/sycoca.py:size=B/16)
  --skip_install         do not copy/install the package again (reuse the workers' copy)
  --detach               start training in the background on the workers (output in
                         ~/sycoca_train.log there) and return
  --dry_run              print the gcloud commands instead of running them
  -h, --help             print this help

Example:
  launch/tpu_pod.sh --name=sycoca-v5p --zone=us-east5-a --accelerator=v5p-128 --spot \
      --workdir=gs://my-bucket/runs/sycoca_b16_cc12m \
      --config=configs/sycoca.py:size=B/16,data=cc12m --config.data.data_dir=gs://my-bucket/tfds
EOF
}

die() {
  echo "tpu_pod: $*" >&2
  exit 2
}

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Where the worker's python3 is older than 3.11: uv from PyPI and the CPython it installs.
UV_VERSION=0.13.8
UV_PYTHON=3.11.18
name="" zone="" accelerator="" workdir="" project="" runtime="" recipe=""
config="configs/sycoca.py:size=B/16"
queued=0 spot=0 skip_install=0 detach=0 dry_run=0
train_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h | --help)
      usage
      exit 0
      ;;
    --name=*) name=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --accelerator=*) accelerator=${1#*=} ;;
    --workdir=*) workdir=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --runtime=*) runtime=${1#*=} ;;
    --recipe=*) recipe=${1#*=} ;;
    --config=*) config=${1#*=} ;;
    --queued) queued=1 ;;
    --spot) spot=1 ;;
    --skip_install) skip_install=1 ;;
    --detach) detach=1 ;;
    --dry_run) dry_run=1 ;;
    --)
      shift
      train_args+=("$@")
      break
      ;;
    *) train_args+=("$1") ;;
  esac
  shift
done
[[ -n $name ]] || die "--name is required (see --help)"
[[ -n $zone ]] || die "--zone is required"
[[ -n $accelerator ]] || die "--accelerator is required, e.g. v5p-128"
[[ $workdir == gs://* ]] || die "--workdir must be a gs:// path that every worker can reach"

if [[ -z $runtime ]]; then
  case "$accelerator" in
    v4-*) runtime=tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) runtime=v2-alpha-tpuv5-lite ;;
    v5p-*) runtime=v2-alpha-tpuv5 ;;
    v6e-*) runtime=v2-alpha-tpuv6e ;;
    *) die "no default --runtime for '$accelerator'; give one" ;;
  esac
fi
if [[ -z $recipe ]]; then
  short=${accelerator/v5litepod-/v5e-}
  [[ -f "$repo_root/launch/recipes/$short.flags" ]] && recipe="launch/recipes/$short.flags"
elif [[ $recipe == "$repo_root"/* ]]; then
  recipe=${recipe#"$repo_root"/}
fi
if [[ -n $recipe && ! -f "$repo_root/$recipe" ]]; then
  die "recipe $recipe not found (it must lie inside this checkout: it is copied to the workers)"
fi

gcloud_args=(--zone="$zone")
[[ -n $project ]] && gcloud_args+=(--project="$project")

run() {
  if [[ $dry_run -eq 1 ]]; then
    local arg words=()
    for arg in "$@"; do
      if [[ $arg =~ ^[A-Za-z0-9_./:=@,+-]+$ ]]; then words+=("$arg"); else words+=("${arg@Q}"); fi
    done
    echo "${words[*]}"
  else
    "$@"
  fi
}

# 1. The slice: reuse it if it exists, else create it (directly or as a queued resource).
if [[ $dry_run -eq 0 ]] && gcloud compute tpus tpu-vm describe "$name" "${gcloud_args[@]}" \
  >/dev/null 2>&1; then
  echo "tpu_pod: reusing TPU VM $name"
elif [[ $queued -eq 1 ]]; then
  capacity=()
  [[ $spot -eq 1 ]] && capacity=(--spot)
  run gcloud compute tpus queued-resources create "$name" --node-id="$name" \
    --accelerator-type="$accelerator" --runtime-version="$runtime" "${capacity[@]}" \
    "${gcloud_args[@]}"
  if [[ $dry_run -eq 0 ]]; then
    echo "tpu_pod: waiting for queued resource $name to become ACTIVE"
    while :; do
      state=$(gcloud compute tpus queued-resources describe "$name" "${gcloud_args[@]}" \
        --format='value(state.state)')
      case "$state" in
        ACTIVE) break ;;
        FAILED | SUSPENDED) die "queued resource $name is $state" ;;
        *) sleep 30 ;;
      esac
    done
  fi
else
  capacity=()
  [[ $spot -eq 1 ]] && capacity=(--spot)
  run gcloud compute tpus tpu-vm create "$name" --accelerator-type="$accelerator" \
    --version="$runtime" "${capacity[@]}" "${gcloud_args[@]}"
fi

# 2. This checkout on every worker, installed with the TPU runtime and GCS support.
if [[ $skip_install -eq 0 ]]; then
  tarball=$(mktemp "${TMPDIR:-/tmp}/sycoca_jax.XXXXXX.tar.gz")
  trap 'rm -f "$tarball"' EXIT
  tar -czf "$tarball" -C "$repo_root" --exclude=.git --exclude=.venv --exclude='*.egg-info' \
    --exclude=__pycache__ --exclude=.pytest_cache --exclude=.ruff_cache .
  run gcloud compute tpus tpu-vm scp "$tarball" "$name:sycoca_jax.tar.gz" --worker=all \
    "${gcloud_args[@]}"
  # jax needs Python >= 3.11; TPU VM images may ship an older python3. Then uv, pinned and
  # installed from PyPI with pip (no remote script is run), creates the venv with a pinned
  # CPython build, which uv checks against the SHA-256 its release records for it.
  install='set -e; rm -rf ~/sycoca_jax ~/sycoca_venv; mkdir -p ~/sycoca_jax'
  install+='; tar -xzf ~/sycoca_jax.tar.gz -C ~/sycoca_jax'
  install+='; if python3 -c "import sys; sys.exit(sys.version_info < (3, 11))"; then'
  install+=' python3 -m venv ~/sycoca_venv; else'
  install+=' { python3 -m pip --version >/dev/null 2>&1 ||'
  install+=' { sudo apt-get update -q && sudo apt-get install -y -q python3-pip; }; }'
  install+=" && python3 -m pip install --user -q uv==$UV_VERSION"
  install+=" && ~/.local/bin/uv venv --seed --python $UV_PYTHON ~/sycoca_venv; fi"
  install+='; ~/sycoca_venv/bin/pip install -q -U pip'
  install+="; ~/sycoca_venv/bin/pip install -q -e ~/sycoca_jax'[tpu,gcs]'"
  run gcloud compute tpus tpu-vm ssh "$name" --worker=all --command="$install" \
    "${gcloud_args[@]}"
fi

# 3. The same command on every worker.
main_args=(--distributed=on "--config=$config" "--workdir=$workdir")
[[ -n $recipe ]] && main_args+=("--flagfile=$recipe")
main_args+=("${train_args[@]}")
# Compiled programs kept in the workdir: a restart after a preemption, on any worker, skips
# the compile.
command="cd ~/sycoca_jax && JAX_COMPILATION_CACHE_DIR=$(printf '%q' "$workdir/compilation_cache")"
command+=" ~/sycoca_venv/bin/python -m sycoca_jax.main"
command+=$(printf ' %q' "${main_args[@]}")
if [[ $detach -eq 1 ]]; then
  command="nohup bash -c $(printf '%q' "$command") > ~/sycoca_train.log 2>&1 &"
fi
echo "tpu_pod: on every worker of $name: $command"
run gcloud compute tpus tpu-vm ssh "$name" --worker=all --command="$command" "${gcloud_args[@]}"
