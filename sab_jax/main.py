"""Entry point: `python -m sab_jax.main --config=experiments/configs/demo.py[:arg] --workdir=DIR`.

Kept short on purpose (as Flax's examples): parse flags, start multi-process JAX when
a launcher asks for it (`sab_jax.distributed`), hand the config to `sab_jax.stages.run`.
A `sab_jax.errors.UserError` (bad config, data, checkpoint or export) ends the run with one
line on stderr and exit status 1; any other exception keeps its traceback.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file (path[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.json.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # orbax logs every file it writes at INFO
    logging.set_verbosity(logging.WARNING)
  # Before anything else touches JAX; after flag parsing, so `--help` stays fast.
  from sab_jax import distributed
  multi_process = distributed.maybe_initialize()
  from sab_jax import errors, stages
  with distributed.fail_fast(active=multi_process):
    try:
      stages.run(_CONFIG.value, _WORKDIR.value)
    except errors.UserError as e:
      print("error: " + errors.one_line(e), file=sys.stderr, flush=True)
      sys.exit(1)


if __name__ == "__main__":
  app.run(main)
