"""deqfuse's warning and error types, and how its warnings are issued.

Every warning deqfuse issues has a stable text (no per-call counts: those are in the info objects), is
attributed to the first frame outside deqfuse and torch (the user's line that called the layer or
`backward()`), and carries the module name 'deqfuse' for filters. So Python's default filter shows each
once per calling line, and

    warnings.filterwarnings("ignore", module="deqfuse")            # everything deqfuse says
    warnings.filterwarnings("ignore", category=deqfuse.ConvergenceWarning)
    warnings.filterwarnings("error", category=deqfuse.ConvergenceWarning)  # or on_nonconvergence="raise"

work as a user expects.
"""
import os
import sys
import warnings

import torch


class ConvergenceWarning(RuntimeWarning):
    """A solve (forward or adjoint) left samples above its tolerance; each returns its best iterate."""


class ConvergenceError(RuntimeError):
    """on_nonconvergence='raise': a solve left samples above its tolerance."""


_SKIP = tuple(os.path.dirname(m.__file__) + os.sep for m in (sys.modules[__package__], torch))


def warn(message: str, category=RuntimeWarning):
    """warnings.warn attributed to the caller's line (the first frame outside deqfuse and torch), under the
    module name 'deqfuse' (so filterwarnings(module='deqfuse') matches)."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_SKIP):
        frame = frame.f_back
    if frame is None:  # called from deqfuse / torch only (e.g. a thread of torch's): plain attribution
        warnings.warn(message, category, stacklevel=2)
        return
    registry = frame.f_globals.setdefault("__warningregistry__", {})
    warnings.warn_explicit(message, category, frame.f_code.co_filename, frame.f_lineno, module=__package__,
                           registry=registry)
