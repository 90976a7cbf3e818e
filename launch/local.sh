#!/usr/bin/env bash
# Runs the pipeline on this machine, as one process or as NUM_PROCESSES local processes
# joined by jax.distributed (coordinator on 127.0.0.1; see sab_jax/distributed.py).
#
#   launch/local.sh --config=experiments/configs/demo.py --workdir=workdir/demo [--config.key=value ...]
#   launch/local.sh experiments/configs/demo.py workdir/demo [--config.key=value ...]   (same)
#   NUM_PROCESSES=2 launch/local.sh --config=experiments/configs/demo.py:smoke,retrain --workdir=/tmp/wd
#
# One process: output goes to the terminal and WORKDIR/log.txt. Several: process i logs to
# LOG_DIR/process_<i>.log (LOG_DIR defaults to WORKDIR/logs), process 0 also to the terminal;
# if any process fails the others are stopped and the exit status is the failed one's.
# Simulated CPU devices per process for sharding experiments: DEVICES=8 launch/local.sh ...
set -euo pipefail

usage() {
  echo "usage: [NUM_PROCESSES=N] [LOG_DIR=DIR] [DEVICES=D] $0 --config=CONFIG[:arg] --workdir=WORKDIR [--config.key=value ...]" >&2
  echo "   or: $0 CONFIG[:arg] WORKDIR [--config.key=value ...]" >&2
  exit 2
}

if [ $# -ge 2 ] && [[ $1 != -* ]]; then  # positional form: CONFIG WORKDIR
  set -- "--config=$1" "--workdir=$2" "${@:3}"
fi
workdir=""
prev=""
for a in "$@"; do
  case $a in
    --workdir=*) workdir=${a#--workdir=} ;;
  esac
  if [ "$prev" = "--workdir" ]; then workdir=$a; fi
  prev=$a
done
if [ -z "$workdir" ]; then usage; fi

if [ -n "${DEVICES:-}" ]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${DEVICES}"
fi
mkdir -p "$workdir"
num=${NUM_PROCESSES:-1}
if ! [[ $num =~ ^[1-9][0-9]*$ ]]; then
  echo "NUM_PROCESSES must be a positive integer, got '$num'" >&2
  exit 2
fi

if [ "$num" -eq 1 ]; then
  python -m sab_jax.main "$@" 2>&1 | tee -a "$workdir/log.txt"
  exit "${PIPESTATUS[0]}"
fi

log_dir=${LOG_DIR:-$workdir/logs}
mkdir -p "$log_dir"
port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export SAB_COORDINATOR="127.0.0.1:$port" SAB_NUM_PROCESSES="$num"

pids=()
stop_all() {  # only the processes this script started
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    alive=0
    for pid in "${pids[@]}"; do if kill -0 "$pid" 2>/dev/null; then alive=1; fi; done
    if [ "$alive" -eq 0 ]; then return; fi
    sleep 0.5
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}
trap 'stop_all; exit 130' INT TERM

echo "[local.sh] $num processes, coordinator $SAB_COORDINATOR, logs in $log_dir/process_<i>.log" >&2
for ((i = 0; i < num; i++)); do
  log="$log_dir/process_$i.log"
  : > "$log"
  if [ "$i" -eq 0 ]; then
    SAB_PROCESS_ID=$i python -m sab_jax.main "$@" > >(tee -a "$log") 2>&1 &
  else
    SAB_PROCESS_ID=$i python -m sab_jax.main "$@" >> "$log" 2>&1 &
  fi
  pids+=($!)
done

# Poll rather than `wait -n`, so that bash 3 (macOS) works too.
status=0
running=("${pids[@]}")
while [ ${#running[@]} -gt 0 ] && [ "$status" -eq 0 ]; do
  sleep 1
  still=()
  for pid in "${running[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      still+=("$pid")
    else
      rc=0
      wait "$pid" || rc=$?
      if [ "$rc" -ne 0 ]; then status=$rc; fi
    fi
  done
  running=("${still[@]+"${still[@]}"}")
done
if [ "$status" -ne 0 ]; then
  echo "[local.sh] a process exited with status $status; stopping the others (see $log_dir)" >&2
  stop_all
fi
wait || true  # reap everything, the tee included
exit "$status"
