"""``tune.with_parameters`` and ``tune.with_resources``: a trainable with large
objects passed through the object store, or with its own resource request."""
from __future__ import annotations

import functools
import inspect
from typing import Any

import beamlet

from .trainable import validate_trainable
from .trial import parse_resources

__all__ = ["with_parameters", "with_resources", "RESOURCES_ATTR", "trainable_resources"]

RESOURCES_ATTR = "_beamlet_tune_resources"


def with_parameters(trainable: Any, **kwargs) -> Any:
    """`trainable` called with ``**kwargs`` as well as its config: a function
    as ``fn(config, **kwargs)``, a class trainable's ``setup(config, **kwargs)``.
    Each value is put in the object store once, here, and read by each trial
    from there, so big datasets are not pickled into every trial."""
    validate_trainable(trainable)
    if not kwargs:
        raise ValueError("with_parameters() needs the parameters to pass, as keywords")
    if not beamlet.is_initialized():
        beamlet.init(ignore_reinit_error=True)
    refs = {name: beamlet.put(value) for name, value in kwargs.items()}

    def fetch() -> dict:
        return {name: beamlet.get(ref) for name, ref in refs.items()}

    if inspect.isclass(trainable):
        class WithParameters(trainable):
            def setup(self, config):
                return trainable.setup(self, config, **fetch())

        WithParameters.__name__ = WithParameters.__qualname__ = trainable.__name__
        for attr in (RESOURCES_ATTR,):
            if hasattr(trainable, attr):
                setattr(WithParameters, attr, getattr(trainable, attr))
        return WithParameters

    if _wants_reporter_besides(trainable, set(kwargs)):
        def inner(config, reporter):
            return trainable(config, reporter, **fetch())
    else:
        def inner(config):
            return trainable(config, **fetch())
    inner.__name__ = inner.__qualname__ = getattr(trainable, "__name__", "trainable")
    if hasattr(trainable, RESOURCES_ATTR):
        setattr(inner, RESOURCES_ATTR, getattr(trainable, RESOURCES_ATTR))
    return inner


def _wants_reporter_besides(fn: Any, names: set) -> bool:
    """Whether ``fn(config, reporter, **params)`` is meant, the params aside."""
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.name not in names and p.kind in (p.POSITIONAL_ONLY,
                                                        p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return False
    return len(params) >= 2 and (params[1].default is inspect.Parameter.empty
                                 or params[1].name == "reporter")


def with_resources(trainable: Any, resources: dict) -> Any:
    """`trainable`, asking for `resources` per trial (``{"cpu": 2, "gpu": 0.5}``)
    unless ``resources_per_trial`` is given."""
    validate_trainable(trainable)
    parse_resources(resources)  # checked now, not at the run
    if inspect.isclass(trainable):
        wrapped = type(trainable.__name__, (trainable,), {RESOURCES_ATTR: dict(resources)})
        return wrapped

    @functools.wraps(trainable)
    def inner(*args, **kwargs):
        return trainable(*args, **kwargs)

    setattr(inner, RESOURCES_ATTR, dict(resources))
    return inner


def trainable_resources(trainable: Any) -> dict | None:
    """The resources ``with_resources`` attached to `trainable`, or None."""
    return getattr(trainable, RESOURCES_ATTR, None)

