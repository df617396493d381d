#!/usr/bin/env bash
# N training processes on this machine, each with its own CPU devices, joined by
# jax.distributed on localhost: the multi-host code path (per-process data slices, global arrays,
# cross-process collectives over gloo, checkpoints written by every process) without a cluster.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/local_multiprocess.sh N [options] [--] FLAGS...

Runs N processes of `python -m sycoca_jax.main FLAGS...` (or another binary, see --module) on
localhost, each seeing --devices_per_process CPU devices, as one multi-process JAX run (what every
host of a TPU pod or GPU cluster does). For testing the multi-host path on a laptop; not for speed.

Options:
  --devices_per_process=D  CPU devices per process (default 4)
  --port=P                 coordinator port on localhost (default: a free one)
  --log_dir=DIR            write every process's output to DIR/process_<i>.log (default:
                           process 0 prints here, the others log to a temporary folder)
  --python=PY              Python interpreter (default: $PYTHON, else python3)
  --module=M               binary to run: sycoca_jax.main (default), sycoca_jax.evaluate or
                           sycoca_jax.transfer
  -h, --help               print this help

The global batch (--config.batch_size) must divide by N and by the N*D devices' data axes.
SIGINT/SIGTERM are passed on to every process (they save a checkpoint at a common step and
exit); if one process fails, the others are stopped and the script exits non-zero.

Example:
  launch/local_multiprocess.sh 2 --config=configs/sycoca.py:tiny --workdir=/tmp/sycoca_mp \
      --config.batch_size=16
EOF
}

die() {
  echo "local_multiprocess: $*" >&2
  exit 2
}

if [[ $# -eq 0 ]]; then
  usage >&2
  exit 2
fi
case "$1" in
  -h | --help)
    usage
    exit 0
    ;;
esac
num_processes=$1
shift
[[ $num_processes =~ ^[1-9][0-9]*$ ]] || die "N must be a positive integer, got '$num_processes'"

devices=4
port=""
log_dir=""
python=${PYTHON:-python3}
module=sycoca_jax.main
train_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h | --help)
      usage
      exit 0
      ;;
    --devices_per_process=*) devices=${1#*=} ;;
    --port=*) port=${1#*=} ;;
    --log_dir=*) log_dir=${1#*=} ;;
    --python=*) python=${1#*=} ;;
    --module=*) module=${1#*=} ;;
    --)
      shift
      train_args+=("$@")
      break
      ;;
    *) train_args+=("$1") ;;
  esac
  shift
done
[[ $devices =~ ^[1-9][0-9]*$ ]] || die "--devices_per_process must be a positive integer"
[[ -z $port || $port =~ ^[0-9]+$ ]] || die "--port must be a number"
case "$module" in
  sycoca_jax.main | sycoca_jax.evaluate | sycoca_jax.transfer) ;;
  *) die "--module must be sycoca_jax.main, sycoca_jax.evaluate or sycoca_jax.transfer, got '$module'" ;;
esac

if [[ -z $port ]]; then
  port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')
fi
keep_process0_here=1
if [[ -n $log_dir ]]; then
  keep_process0_here=0
  mkdir -p "$log_dir"
else
  log_dir=$(mktemp -d "${TMPDIR:-/tmp}/sycoca_multiprocess.XXXXXX")
fi

pids=()
interrupted=0
stop_all() { # $1: signal
  local pid
  for pid in "${pids[@]}"; do
    kill "-$1" "$pid" 2>/dev/null || true
  done
}
# shellcheck disable=SC2329  # called by the trap below
on_signal() {
  interrupted=1
  echo "local_multiprocess: passing SIGTERM on to every process" >&2
  stop_all TERM
}
trap on_signal INT TERM

# Each process in its own process group: Ctrl-C then reaches only this script, which passes on
# SIGTERM (a checkpoint at a common step), instead of interrupting every process mid-step.
set -m
xla_flags="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices"
# Compiled programs are reused by the next run of the same program.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-${TMPDIR:-/tmp}/sycoca_jax_compilation_cache}
for ((i = 0; i < num_processes; i++)); do
  log="$log_dir/process_$i.log"
  command=(
    "$python" -m "$module" "${train_args[@]}"
    "--coordinator_address=localhost:$port" "--num_processes=$num_processes" "--process_id=$i"
  )
  if [[ $i -eq 0 && $keep_process0_here -eq 1 ]]; then
    JAX_PLATFORMS=cpu XLA_FLAGS=$xla_flags "${command[@]}" &
    log="(this terminal)"
  else
    JAX_PLATFORMS=cpu XLA_FLAGS=$xla_flags "${command[@]}" >"$log" 2>&1 &
  fi
  pids+=("$!")
  echo "local_multiprocess: process $i pid $! log $log" >&2
done

status=0
remaining=$num_processes
while [[ $remaining -gt 0 ]]; do
  rc=0
  wait -n || rc=$?
  if [[ $interrupted -eq 1 && $rc -gt 128 ]]; then
    interrupted=0 # the wait was cut short by our own trap: no process has ended yet
    continue
  fi
  remaining=$((remaining - 1))
  if [[ $rc -ne 0 ]]; then
    status=$rc
    echo "local_multiprocess: a process exited with status $rc; stopping the others" >&2
    stop_all KILL
    wait || true
    for log in "$log_dir"/process_*.log; do
      echo "---- tail of $log" >&2
      tail -n 20 "$log" >&2
    done
    break
  fi
done
exit "$status"
