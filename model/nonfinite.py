"""The one error `t2i train` and `t2i dpo` raise when a loss turns NaN or infinite."""

from __future__ import annotations


class NonFiniteLossError(ValueError):
    """The loss became NaN or infinite; training stopped before applying that step.

    A ValueError, so the command line reports it as a one-line error with its advice.
    """
