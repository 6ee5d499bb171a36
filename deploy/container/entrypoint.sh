#!/bin/sh
# The images' entry point: `flq-entrypoint flq-master|flq-worker ARGS...` runs `DAEMON run` with
# JSON logs on stdout and ARGS. The master writes its results to $FLQ_RUN_DIR (the state volume)
# and resumes from the checkpoint there when the container is restarted (as the systemd unit
# does: delete the directory to start a fresh run). `exec`: the daemon is PID 1's process and
# gets the container runtime's SIGTERM itself (it finishes the round and checkpoints).
set -eu
daemon="$1"
shift
case "$daemon" in
  flq-master)
    resume=""
    if [ -f "$FLQ_RUN_DIR/checkpoint.npz" ]; then resume="--resume"; fi
    exec flq-master run --log-format json --run-dir "$FLQ_RUN_DIR" "$@" $resume ;;
  flq-worker)
    exec flq-worker run --log-format json "$@" ;;
  *)
    exec "$daemon" "$@" ;;
esac
