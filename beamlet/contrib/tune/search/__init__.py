"""Search algorithms and searchers (Ray's ``ray.tune.search``): what makes the
configs of an experiment's trials. ``OptunaSearch`` is in
``beamlet.tune.search.optuna`` (the optional extra ``beamlet[optuna]``)."""
from .search_algorithm import (BasicVariantGenerator, SearchAlgorithm, SearchGenerator,
                               as_search_alg)
from .searcher import ConcurrencyLimiter, Searcher

__all__ = ["Searcher", "ConcurrencyLimiter", "SearchAlgorithm", "SearchGenerator",
           "BasicVariantGenerator", "as_search_alg"]


from ..plugins import hookimpl  # noqa: E402


@hookimpl
def beamlet_tune_searchers():
    """OptunaSearch when optuna is installed (imported only when made)."""
    import importlib.util
    if importlib.util.find_spec("optuna") is None:
        return {}

    def optuna_search(**kwargs):
        from .optuna import OptunaSearch
        return OptunaSearch(**kwargs)

    return {"optuna": optuna_search}
