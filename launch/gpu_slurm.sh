#!/usr/bin/env bash
# Runs one qedjax program across the GPU nodes of a SLURM allocation (see launch/README.md).
#
#   sbatch [--nodes=N --gpus-per-node=G ...] launch/gpu_slurm.sh LAUNCH_ARGS...
#   launch/gpu_slurm.sh LAUNCH_ARGS...          (inside an salloc allocation)
#
# QEDJAX_SLURM_MODE picks how processes map to GPUs:
#   node (default)  one process per node driving all of its GPUs. The coordinator is the first node
#                   of the job; --coordinator/--num-processes/--process-id come from SLURM's variables,
#                   and JAX_LOCAL_DEVICE_IDS lists every GPU of the node (inside a SLURM step jax would
#                   otherwise give each process only GPU number SLURM_LOCALID).
#   gpu             one process per GPU; jax.distributed.initialize() detects everything from SLURM
#                   (QEDJAX_DISTRIBUTED=auto). Every task must see all GPUs of its node: allocate with
#                   --gpus-per-node, not --gpus-per-task.
# Environment: QEDJAX_PYTHON (default: .venv/bin/python), QEDJAX_PORT (coordinator port; default
# derived from the job id), QEDJAX_DRY_RUN=1 prints the srun command instead of running it.
# Checkpoints and the run directory must be on storage every node sees (a shared filesystem or gs://).
#
#SBATCH --job-name=qedjax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --exclusive
#SBATCH --output=logs/qedjax-%j.out
set -euo pipefail

if [[ -z ${SLURM_JOB_ID:-} ]]; then
  echo "gpu_slurm.sh: not inside a SLURM job; submit it with sbatch or run it inside salloc" >&2
  exit 2
fi
[[ $# -gt 0 ]] || { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

cd "${SLURM_SUBMIT_DIR:-.}"
mkdir -p logs
python=${QEDJAX_PYTHON:-.venv/bin/python}
mode=${QEDJAX_SLURM_MODE:-node}
nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:?}}
gpus=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}
gpus=${gpus##*:}  # "h100:8" -> "8"
if [[ -z $gpus ]]; then
  gpus=$(nvidia-smi -L | wc -l)
fi
head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
port=${QEDJAX_PORT:-$((20000 + SLURM_JOB_ID % 20000))}

case $mode in
  node)
    # SLURM_PROCID differs per task, so it is read inside each task, not here.
    cmd=(env JAX_LOCAL_DEVICE_IDS="$(seq -s, 0 $((gpus - 1)))"
         srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1
         bash -c 'exec "$0" -m qedjax.launch --coordinator "$1" --num-processes "$2" --process-id "$SLURM_PROCID" "${@:3}"'
         "$python" "$head:$port" "$nodes" "$@")
    ;;
  gpu)
    cmd=(env QEDJAX_DISTRIBUTED=auto JAX_COORDINATOR_PORT="$port"
         srun --nodes="$nodes" --ntasks=$((nodes * gpus)) --ntasks-per-node="$gpus" --kill-on-bad-exit=1
         "$python" -m qedjax.launch "$@")
    ;;
  *)
    echo "gpu_slurm.sh: QEDJAX_SLURM_MODE must be node or gpu, got $mode" >&2
    exit 2
    ;;
esac

echo "[gpu_slurm] job $SLURM_JOB_ID: $nodes node(s) x $gpus GPU(s), mode $mode, coordinator $head:$port" >&2
if [[ ${QEDJAX_DRY_RUN:-0} == 1 ]]; then
  printf '%q ' "${cmd[@]}"
  echo
else
  exec "${cmd[@]}"
fi
