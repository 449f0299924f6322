"""Trial schedulers (Ray's ``ray.tune.schedulers``): which trial runs next, and
whether a trial continues, pauses or stops after each result."""
from .async_hyperband import ASHAScheduler, AsyncHyperBandScheduler
from .hyperband import HyperBandScheduler
from .median_stopping_rule import MedianStoppingRule
from .pbt import PopulationBasedTraining
from .trial_scheduler import FIFOScheduler, TrialScheduler

__all__ = ["TrialScheduler", "FIFOScheduler", "AsyncHyperBandScheduler", "ASHAScheduler",
           "HyperBandScheduler", "MedianStoppingRule", "PopulationBasedTraining"]


from ..plugins import hookimpl  # noqa: E402


@hookimpl
def beamlet_tune_schedulers():
    return {"fifo": FIFOScheduler, "async_hyperband": AsyncHyperBandScheduler,
            "asha": ASHAScheduler, "hyperband": HyperBandScheduler,
            "median_stopping_rule": MedianStoppingRule, "pbt": PopulationBasedTraining}
