"""The library's expected failures: exceptions raised on purpose, with a message for the user.

Every layer raises them (the zoo, the loaders, the engine...), and the stage CLI
(:func:`imageclf.stage.main`) turns the ones in :data:`EXPECTED_ERRORS` into one sentence on
stderr and exit status 1. They live here, not in the CLI module, so that library code does not
import the CLI to raise them. Anything else (a ``KeyError``, a ``ValueError`` from deep inside
torch...) is a bug and keeps its full traceback, because one sentence would hide where it happened.
"""

from __future__ import annotations

from imageclf.config import ParamsError


class StageError(RuntimeError):
    """An expected failure with a message that says what was wrong and what to do."""


class InvalidInput(StageError, ValueError):
    """Input data or configuration the library cannot use, found below the stage.

    A :class:`StageError` (one sentence from a stage CLI) that is still a ``ValueError``, so that
    callers which caught the ``ValueError`` it used to be (``except ValueError``) still do."""


# Raised on purpose, with a message meant for the user. Deliberately not ValueError or
# RuntimeError: torch, NumPy and our own bugs raise those too, and their tracebacks matter.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    StageError,  # and its kin: InvalidInput, OverfitFailed, DownloadError, TrainingDiverged
    ParamsError,
    FileNotFoundError,  # a missing input; the library's messages name the stage to run
)
