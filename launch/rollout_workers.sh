#!/usr/bin/env bash
# Starts qedjax rollout workers (vLLM) on GPU nodes (see launch/README.md, "Rollout workers").
#
#   sbatch [--nodes=N --gpus-per-node=G ...] launch/rollout_workers.sh WORKER_ARGS...
#   launch/rollout_workers.sh WORKER_ARGS...                     (inside an salloc allocation)
#   launch/rollout_workers.sh --hosts H1,H2,... WORKER_ARGS...   (no SLURM: ssh to each host)
#   launch/rollout_workers.sh --stop --hosts H1,H2,...           (SIGTERM to the ssh-started workers)
#
# WORKER_ARGS go to `python -m qedjax.rollout.worker`: --store URL (the trainer's engine.store) and this
# machine's own settings, nothing else: the trainer describes the run in the store (the queue, the
# context length, the dtype, the tokenizer, the RC summariser). For example, one copy per GPU node:
#   launch/rollout_workers.sh --store gs://BUCKET/run/weights --gpu-memory-utilization 0.6 \
#       --summarizer-vllm-arg gpu_memory_utilization=0.3
# (with an RC summariser of its own each worker runs two vLLM engines: give each its share of the GPU,
# together under 0.95). Each node runs GPUS / TP workers, each on its own TP GPUs (CUDA_VISIBLE_DEVICES)
# with --tensor-parallel-size TP, named HOST-INDEX in the queue and logging to
# logs/rollout-worker-HOST-INDEX.log. Workers exit by themselves when the trainer finishes the stage (it
# closes the queue); SIGTERM (scancel, --stop) makes a worker leave, and the trainer gives its items to
# the others. Workers started with --hosts run detached (nohup): an ssh drop leaves them running.
#
# Environment:
#   QEDJAX_TP           GPUs per worker, vLLM's tensor parallelism (default 1: a 4B model fits one GPU)
#   QEDJAX_GPUS         GPUs per node (default: CUDA_VISIBLE_DEVICES's count, else nvidia-smi's)
#   QEDJAX_PYTHON       interpreter, relative to the checkout (default .venv/bin/python)
#   QEDJAX_REMOTE_DIR   --hosts: the checkout on the hosts (default: this one's path, a shared filesystem)
#   QEDJAX_DRY_RUN=1    print the srun / ssh commands instead of running them
#
#SBATCH --job-name=qedjax-rollout
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --output=logs/rollout-workers-%j.out
set -euo pipefail

usage() { sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

hosts="" stop=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --hosts) hosts=$2; shift 2 ;;
    --stop) stop=1; shift ;;
    --help|-h) usage ;;
    *) break ;;
  esac
done
[[ $stop == 1 || $# -gt 0 ]] || usage

repo=$(cd "$(dirname "$0")/.." && pwd)
python=${QEDJAX_PYTHON:-.venv/bin/python}
tp=${QEDJAX_TP:-1}
remote_dir=${QEDJAX_REMOTE_DIR:-$repo}

run() {  # prints the command (quoted as a shell would need it) with QEDJAX_DRY_RUN=1, else runs it
  if [[ ${QEDJAX_DRY_RUN:-0} == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

# One node's workers, run on that node by bash -c: its GPUs in groups of TP, one worker per group.
# Arguments: python, TP, GPUs per node ("" = count them), wait (1: stay until the workers exit,
# forwarding SIGTERM; 0: leave them running), then the worker arguments.
node_script='
py=$1 tp=$2 want=$3 stay=$4; shift 4
ids=(${CUDA_VISIBLE_DEVICES//,/ })
(( ${#ids[@]} )) || ids=($(seq 0 $(( $(nvidia-smi -L | wc -l) - 1 ))))
gpus=${want:-${#ids[@]}}
(( gpus >= tp )) || { echo "$(hostname -s): $gpus GPU(s) cannot hold a worker of TP=$tp" >&2; exit 2; }
mkdir -p logs
pids=()
for ((i = 0; i < gpus / tp; i++)); do
  name=$(hostname -s)-$i
  devices=$(IFS=,; echo "${ids[*]:i*tp:tp}")
  CUDA_VISIBLE_DEVICES=$devices nohup "$py" -m qedjax.rollout.worker --worker-id "$name" \
    --tensor-parallel-size "$tp" "$@" < /dev/null > "logs/rollout-worker-$name.log" 2>&1 &
  pids+=($!)
  echo "$name: GPUs $devices, pid $!, log logs/rollout-worker-$name.log"
done
printf "%s\n" "${pids[@]}" > ~/.qedjax-rollout-workers-$(hostname -s).pid
if [[ $stay == 1 ]]; then
  trap "kill -TERM ${pids[*]} 2>/dev/null" TERM INT
  wait || true
  wait  # after a signal: until every worker has handed back its item
fi'

if [[ -n $hosts ]]; then
  IFS=, read -r -a host_list <<< "$hosts"
  for host in "${host_list[@]}"; do
    if [[ $stop == 1 ]]; then
      run ssh "$host" 'f=~/.qedjax-rollout-workers-$(hostname -s).pid
[ -f $f ] && kill -TERM $(cat $f) 2>/dev/null; rm -f $f; echo "$(hostname -s): sent SIGTERM"'
    else
      args=$(printf '%q ' "$python" "$tp" "${QEDJAX_GPUS:-}" 0 "$@")
      run ssh "$host" "cd $(printf '%q' "$remote_dir") && bash -c $(printf '%q' "$node_script") _ $args"
    fi
  done
  exit 0
fi

if [[ $stop == 1 ]]; then
  echo "rollout_workers.sh: --stop needs --hosts (stop a SLURM job with scancel, which sends SIGTERM)" >&2
  exit 2
fi
if [[ -z ${SLURM_JOB_ID:-} ]]; then
  echo "rollout_workers.sh: not inside a SLURM job: submit it with sbatch, run it inside salloc, or pass --hosts" >&2
  exit 2
fi

cd "${SLURM_SUBMIT_DIR:-$repo}"
mkdir -p logs
nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:?}}
# One task per node, which starts that node's workers and waits for them; a worker that fails does not
# take the others down (the trainer stops on the failure the worker reports).
echo "[rollout_workers] job $SLURM_JOB_ID: $nodes node(s), workers of $tp GPU(s)" >&2
run srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=0 \
  bash -c "$node_script" _ "$python" "$tp" "${QEDJAX_GPUS:-}" 1 "$@"
