"""Errors that describe a problem with the user's input, not a bug.

`sab_jax.main` prints a `UserError` as one line (what is wrong and how to fix it) and exits
non-zero; any other exception keeps its traceback. The subclasses also derive from
ValueError, so code that caught ValueError before still does.
"""


def one_line(e: BaseException) -> str:
  """The message of `e` on one line (how every command prints a UserError), else its type's name."""
  return " ".join(str(e).split()) or type(e).__name__


class UserError(ValueError):
  """Bad config, data, checkpoint or export: the message names the problem and the fix."""


class DamagedExport(UserError):
  """An export directory that cannot be read back (missing, corrupt or edited files)."""


class MissingPrerequisite(UserError):
  """A stage was asked to run before the stage that produces what it reads."""
