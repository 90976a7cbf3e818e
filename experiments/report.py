"""`python experiments/report.py RESULTS.json ... --out OUT`: the same as `python -m sab_jax.report`
(the code moved into the package, which ends every pipeline run with it)."""

import sys

from sab_jax import report

if __name__ == "__main__":
  sys.exit(report.main())
