#!/usr/bin/env bash
# Runs the pipeline on this machine: launch/local.sh CONFIG WORKDIR [--config.key=value ...]
#   launch/local.sh experiments/configs/demo.py workdir/demo
#   launch/local.sh experiments/configs/demo.py:retrain workdir/teacher --config.train.num_steps=2000
# Simulated devices for sharding experiments on a CPU: DEVICES=8 launch/local.sh ...
# (Multi-process launches with a local coordinator come with the distillation trainer.)
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 CONFIG[:arg] WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
if [ -n "${DEVICES:-}" ]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${DEVICES}"
fi
mkdir -p "$workdir"
python -m sab_jax.main --config="$config" --workdir="$workdir" "$@" 2>&1 | tee -a "$workdir/log.txt"
