#!/usr/bin/env bash
# Runs one qedjax program on every worker of a Cloud TPU VM slice (see launch/README.md).
#
#   launch/tpu_pod.sh [--sync] [--setup] [--dry-run] TPU_NAME ZONE -- LAUNCH_ARGS...
#   launch/tpu_pod.sh --stop|--kill|--attach [--dry-run] TPU_NAME ZONE
#
#   --sync     copy this checkout (tracked and untracked-but-not-ignored files, and .git so that
#              run_info.json records the commit and dirty flag) to every worker first
#   --setup    create the remote virtualenv and install qedjax with its TPU extra
#   --stop     send SIGTERM to the program on every worker (it saves a checkpoint, then exits)
#   --kill     send SIGKILL (a run that hangs; it resumes from its last checkpoint)
#   --attach   follow the running program's logs again (after an ssh drop, which the program survives)
#   --dry-run  print the gcloud commands instead of running them
#
# Every worker runs `python -m qedjax.launch LAUNCH_ARGS` with QEDJAX_DISTRIBUTED=auto: the launcher
# calls jax.distributed.initialize(), which finds the coordinator, process count and id from the TPU
# metadata. Each worker reads its own rows of every batch. Checkpoints must go to storage every worker
# sees (GCS, run.checkpoint_dir=gs://...); only process 0 writes metrics and logs (run.dir, local).
#
# Environment:
#   PROJECT             gcloud project (default: gcloud's configured one)
#   QEDJAX_REMOTE_DIR   checkout directory on the workers, relative to the remote home (default: qedjax)
#   QEDJAX_PYTHON       interpreter on the workers, relative to that directory (default: .venv/bin/python)
#   QEDJAX_ENV          extra "KEY=VALUE ..." exported on the workers (e.g. LIBTPU_INIT_ARGS=...)
#
# Example:
#   launch/tpu_pod.sh --sync --setup my-v5p-32 europe-west4-b -- \
#       --config configs/qwen3-0.6b-sft.yaml --mesh data=2,fsdp=8 \
#       run.dir=runs/qwen3-0.6b-sft run.checkpoint_dir=gs://BUCKET/qwen3-0.6b-sft
set -euo pipefail

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

sync=0 setup=0 stop=0 attach=0 dry=0 sig=TERM
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in
    --sync) sync=1 ;;
    --setup) setup=1 ;;
    --stop) stop=1 ;;
    --kill) stop=1 sig=KILL ;;
    --attach) attach=1 ;;
    --dry-run) dry=1 ;;
    --help|-h) usage ;;
    *) echo "tpu_pod.sh: unknown option $1" >&2; usage ;;
  esac
  shift
done
[[ $# -ge 2 ]] || usage
tpu=$1 zone=$2
shift 2
if [[ $stop == 0 && $attach == 0 ]]; then
  [[ ${1:-} == -- ]] || { echo "tpu_pod.sh: put the launcher's arguments after --" >&2; usage; }
  shift
  [[ $# -gt 0 ]] || { echo "tpu_pod.sh: no launcher arguments (at least --config FILE)" >&2; usage; }
fi

remote_dir=${QEDJAX_REMOTE_DIR:-qedjax}
python=${QEDJAX_PYTHON:-.venv/bin/python}
gcloud_args=(--zone="$zone" --worker=all)
[[ -n ${PROJECT:-} ]] && gcloud_args+=(--project="$PROJECT")

run() {  # prints the command (quoted as a shell would need it) with --dry-run, else runs it
  if [[ $dry == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$tpu" "${gcloud_args[@]}" --command="$1"
}

if [[ $stop == 1 ]]; then
  # The program saves a checkpoint after its current step and exits (see launch/README.md on
  # stopping a multi-host run).
  on_all_workers "if [ -f ~/.qedjax-launch.pid ]; then kill -$sig \$(cat ~/.qedjax-launch.pid) && echo \"\$(hostname): sent SIG$sig\"; fi"
  exit 0
fi

if [[ $attach == 1 ]]; then
  on_all_workers "cd $(printf '%q' "$remote_dir") && tail -n 50 -F --pid=\$(cat ~/.qedjax-launch.pid) logs/launch-\$(hostname).log"
  exit 0
fi
if [[ $sync == 1 ]]; then
  repo=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  (cd "$repo" && git ls-files -z --cached --others --exclude-standard |
     while IFS= read -r -d '' f; do [[ -e $f ]] && printf '%s\0' "$f"; done > "$work/files" &&
     tar --null -czf "$work/qedjax.tgz" -T "$work/files" .git)
  run gcloud compute tpus tpu-vm scp "$work/qedjax.tgz" "$tpu:qedjax-sync.tgz" "${gcloud_args[@]}"
  on_all_workers "mkdir -p $(printf '%q' "$remote_dir") && tar -xzf ~/qedjax-sync.tgz -C $(printf '%q' "$remote_dir") && rm ~/qedjax-sync.tgz"
fi

if [[ $setup == 1 ]]; then
  on_all_workers "cd $(printf '%q' "$remote_dir") && python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -e '.[tpu]'"
fi

# Each worker: the program detached from the ssh session (nohup, its own session), so that an ssh drop
# (a laptop closing) leaves the run going; its own log under logs/, its pid for --stop, its exit status
# in ~/.qedjax-launch.status. This ssh session follows the log until the program exits and returns its
# status; after a drop, `--attach` follows the logs again.
launch_args=$(printf '%q ' "$@")
on_all_workers "cd $(printf '%q' "$remote_dir") && mkdir -p logs && \
export QEDJAX_DISTRIBUTED=auto ${QEDJAX_ENV:-} && log=logs/launch-\$(hostname).log && rm -f ~/.qedjax-launch.status; \
nohup setsid bash -c '$python -m qedjax.launch $launch_args > \$0 2>&1 & echo \$! > ~/.qedjax-launch.pid; \
wait \$!; echo \$? > ~/.qedjax-launch.status' \$log < /dev/null > /dev/null 2>&1 & \
tail -n +1 -F --pid=\$! \$log 2>/dev/null; exit \$(cat ~/.qedjax-launch.status 2>/dev/null || echo 1)"
