"""TuneError: what `tune.run` and `run_experiments` raise on their own account."""
from __future__ import annotations

from beamlet.exceptions import BeamletError

__all__ = ["TuneError"]


class TuneError(BeamletError):
    """An experiment could not run as asked, or some of its trials failed
    (``tune.run(..., raise_on_failed_trial=False)`` returns them instead).
    ``.trials`` holds the trials that did not complete, when that is the cause."""

    def __init__(self, message: str, trials: list | None = None):
        super().__init__(message)
        self.trials = list(trials or [])

    def __reduce__(self):
        return (TuneError, (str(self), self.trials))
