#!/usr/bin/env bash
# GRPO with the trainer on a Cloud TPU VM slice and vLLM rollout workers on GPU nodes (see
# launch/README.md, "Rollout workers").
#
#   launch/tpu_pod_with_gpu_workers.sh [--sync] [--setup] [--dry-run] TPU_NAME ZONE -- LAUNCH_ARGS...
#
# LAUNCH_ARGS are the trainer's (`--config C [--mesh ...] [key=value ...]`); the config must say
# engine.kind=workers and engine.store (a gs:// URL: the TPU hosts and the GPU nodes share nothing but
# the bucket; the work queue defaults to rollout_queue beside the store). The script
#   1. reads those values from the config (with this checkout's python);
#   2. starts the workers with `--store URL` and QEDJAX_WORKER_ARGS, on the hosts of QEDJAX_WORKER_HOSTS
#      over ssh (launch/rollout_workers.sh --hosts), or as a SLURM job submitted from here with the
#      sbatch options in QEDJAX_WORKER_SBATCH; they wait for the trainer to describe the run;
#   3. runs the trainer on every TPU worker with launch/tpu_pod.sh (--sync, --setup, --dry-run passed
#      on); the trainer runs detached there and survives an ssh drop (tpu_pod.sh --attach follows it again);
#   4. when the trainer has finished the stage it closes the queue and the workers exit by themselves;
#      if it failed or was stopped, the workers are stopped here (the next run purges the queue).
#
# Environment:
#   QEDJAX_WORKER_HOSTS      h1,h2,...: GPU hosts to start workers on over ssh; or
#   QEDJAX_WORKER_SBATCH     sbatch options ("--nodes=4 --gpus-per-node=8 --partition=gpu"): one SLURM job
#   QEDJAX_WORKER_ARGS       the GPU nodes' own settings, e.g. "--gpu-memory-utilization 0.6
#                            --summarizer-vllm-arg gpu_memory_utilization=0.3"
#   QEDJAX_LOCAL_PYTHON      the interpreter here that reads the config (default .venv/bin/python)
#   and those of launch/tpu_pod.sh (trainer) and launch/rollout_workers.sh (workers: QEDJAX_TP, ...).
set -euo pipefail

usage() { sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

pod_flags=() dry=0
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in
    --sync|--setup) pod_flags+=("$1") ;;
    --dry-run) pod_flags+=("$1"); dry=1 ;;
    --help|-h) usage ;;
    *) echo "tpu_pod_with_gpu_workers.sh: unknown option $1" >&2; usage ;;
  esac
  shift
done
[[ $# -ge 3 && $3 == -- ]] || usage
tpu=$1 zone=$2
shift 3
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/.."

# 1. What the trainer will use, read the way the launcher reads it.
mapfile -t values < <("${QEDJAX_LOCAL_PYTHON:-.venv/bin/python}" -c '
import sys
from qedjax import launch
from qedjax.config import load_config
args = launch.parse_args(sys.argv[1:])
cfg = load_config(args.config, list(args.overrides))
for value in (cfg.engine.kind, cfg.engine.store, cfg.engine.queue):
    print(value or "")
' "$@")
kind=${values[0]} store=${values[1]} queue=${values[2]}
fail() { echo "tpu_pod_with_gpu_workers.sh: $1" >&2; exit 2; }
[[ $kind == workers ]] || fail "the config's engine.kind is $kind, not workers"
[[ $store == gs://* ]] || fail "engine.store must be a gs:// URL both sides reach (got '$store')"
[[ -z $queue || $queue == gs://* ]] || fail "engine.queue must be a gs:// URL both sides reach, or unset (got '$queue')"
read -r -a extra <<< "${QEDJAX_WORKER_ARGS:-}"
worker_args=(--store "$store" "${extra[@]}")

# 2. The workers first: they wait for the trainer's first published version.
job=""
if [[ -n ${QEDJAX_WORKER_HOSTS:-} ]]; then
  QEDJAX_DRY_RUN=$dry "$here/rollout_workers.sh" --hosts "$QEDJAX_WORKER_HOSTS" "${worker_args[@]}"
elif [[ -n ${QEDJAX_WORKER_SBATCH:-} ]]; then
  read -r -a sbatch_opts <<< "$QEDJAX_WORKER_SBATCH"
  if [[ $dry == 1 ]]; then
    printf '%q ' sbatch --parsable "${sbatch_opts[@]}" "$here/rollout_workers.sh" "${worker_args[@]}"; echo
  else
    mkdir -p logs
    job=$(sbatch --parsable "${sbatch_opts[@]}" "$here/rollout_workers.sh" "${worker_args[@]}")
    echo "[tpu_pod_with_gpu_workers] rollout workers: SLURM job $job" >&2
  fi
else
  echo "tpu_pod_with_gpu_workers.sh: set QEDJAX_WORKER_HOSTS or QEDJAX_WORKER_SBATCH to start the workers" >&2
  exit 2
fi

stop_workers() {
  if [[ -n $job ]]; then
    scancel "$job"
  elif [[ -n ${QEDJAX_WORKER_HOSTS:-} ]]; then
    QEDJAX_DRY_RUN=$dry "$here/rollout_workers.sh" --stop --hosts "$QEDJAX_WORKER_HOSTS"
  fi
}

# 3. The trainer on every TPU worker.
status=0
"$here/tpu_pod.sh" "${pod_flags[@]}" "$tpu" "$zone" -- "$@" || status=$?

# 4. Finished: the workers saw the queue close. Failed or stopped: stop them.
if [[ $status != 0 ]]; then
  echo "[tpu_pod_with_gpu_workers] trainer exited with status $status: stopping the rollout workers" >&2
  stop_workers
fi
exit "$status"
