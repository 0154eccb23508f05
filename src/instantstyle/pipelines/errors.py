"""The one exception type for user mistakes (arguments, files, models named on the command line).

The CLI prints it as one line, ``instantstyle: error: ...``, and exits 2; anything else is a
bug and keeps its traceback under ``--debug``.
"""


class UserError(Exception):
    """A mistake in the command line or the files it names: reported without a traceback."""
