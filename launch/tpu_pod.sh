#!/usr/bin/env bash
# Runs the pipeline on every worker of a Cloud TPU VM pod slice, one process per host.
#
#   launch/tpu_pod.sh TPU_NAME ZONE PROJECT -- --config=experiments/configs/llava7b_pod.py \
#       --workdir=/mnt/shared/llava7b --config.teacher.init=/mnt/shared/llava-1.5-7b-hf
#
# 1. copies this checkout (tracked and untracked-but-not-ignored files) to REMOTE_DIR on
#    every worker and installs it there (`pip install -e . jax[tpu]`); SKIP_SETUP=1 skips
#    both for a rerun of the same code;
# 2. starts `python -m sab_jax.main ARGS` on all workers at once with SAB_DISTRIBUTED=auto
#    (JAX finds the other hosts from the TPU metadata; sab_jax/distributed.py);
# 3. each worker logs to ~/sab_logs/worker_<hostname>.log (and to this terminal).
#
# The workdir must be one directory that every worker sees (a gcsfuse or Filestore mount):
# orbax writes each checkpoint together from all hosts. TFDS_DATA_DIR and LIBTPU_INIT_ARGS
# are passed on when set here. Needs the gcloud CLI, authenticated for PROJECT.
set -euo pipefail

usage() {
  echo "usage: $0 TPU_NAME ZONE PROJECT -- --config=CONFIG[:arg] --workdir=SHARED_DIR [--config.key=value ...]" >&2
  echo "  env: REMOTE_DIR (default ~/sab_jax), SKIP_SETUP=1, PIP_PACKAGES (default: jax[tpu])" >&2
  exit 2
}

if [ $# -lt 4 ] || [ "$4" != "--" ]; then usage; fi
tpu=$1 zone=$2 project=$3
shift 4
if [ $# -eq 0 ]; then usage; fi

remote_dir=${REMOTE_DIR:-'~/sab_jax'}  # expanded by the remote shell
pip_packages=${PIP_PACKAGES:-'jax[tpu]'}
repo=$(cd "$(dirname "$0")/.." && pwd)
where=(--zone="$zone" --project="$project" --worker=all)

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$tpu" "${where[@]}" --command="$1"
}

if [ "${SKIP_SETUP:-0}" != 1 ]; then
  staging=$(mktemp -d)
  trap 'rm -rf "$staging"' EXIT
  # Not workdirs, virtualenvs or .git: only what `git status` would show, plus tracked files.
  if git -C "$repo" rev-parse --is-inside-work-tree > /dev/null 2>&1; then
    (cd "$repo" && git ls-files -z --cached --others --exclude-standard \
      | tar --null -T - -czf "$staging/sab_jax.tar.gz")
  else  # an unpacked release, not a checkout
    tar -C "$repo" --exclude=.git --exclude='workdir*' --exclude=.venv --exclude=__pycache__ \
      -czf "$staging/sab_jax.tar.gz" .
  fi
  echo "[tpu_pod.sh] copying $(du -h "$staging/sab_jax.tar.gz" | cut -f1) to $tpu:$remote_dir on all workers" >&2
  gcloud compute tpus tpu-vm scp --recurse "${where[@]}" "$staging/sab_jax.tar.gz" "$tpu:~/"
  on_all_workers "set -e; mkdir -p $remote_dir; tar -xzf ~/sab_jax.tar.gz -C $remote_dir; \
cd $remote_dir && pip install -q -e . '$pip_packages'"
fi

env_prefix="SAB_DISTRIBUTED=auto"
for var in TFDS_DATA_DIR LIBTPU_INIT_ARGS; do
  if [ -n "${!var:-}" ]; then env_prefix+=" $var=$(printf '%q' "${!var}")"; fi
done
main_args=$(printf '%q ' "$@")
echo "[tpu_pod.sh] running on all workers of $tpu: python -m sab_jax.main $main_args" >&2
on_all_workers "set -o pipefail; mkdir -p ~/sab_logs; cd $remote_dir && \
$env_prefix python -m sab_jax.main $main_args 2>&1 | tee ~/sab_logs/worker_\$(hostname).log"
