"""User-facing errors: every one carries a single line saying what is wrong and what to do.

The CLI prints ``str(err)`` alone (no traceback) and exits non-zero; library users can catch
``RoutelensError`` or one of its subclasses.
"""


class RoutelensError(Exception):
    """A problem with the user's input or environment, stated in one line."""

    exit_code = 2


class UnsupportedModelError(RoutelensError):
    """The model has no MoE layers, or no adapter knows its architecture."""


class InputError(RoutelensError):
    """The input file or texts cannot be traced as given."""


class StoreError(RoutelensError):
    """The store path is not a routelens store, is too new, or a run does not exist."""


class VersionError(RoutelensError):
    """An installed dependency is older than routelens supports."""
