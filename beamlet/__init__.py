"""beamlet: Python functions as tasks and classes as actors, across processes
and machines, with Ray's programming model and pluggable backends.

    import beamlet as ray
    ray.init()                      # backend="local" | "inprocess" | a plugin's

    @ray.remote
    def square(x):
        return x * x

    ray.get([square.remote(i) for i in range(4)])   # [0, 1, 4, 9]

The names below are loaded on first use (PEP 562), so that a process that
imports only part of beamlet, such as a Dask worker running beamlet tasks,
does not pay for the rest.
"""
import importlib as _importlib

__version__ = "0.1.0"

#: name -> the module it comes from (relative to this package).
_LAZY = {
    **dict.fromkeys(("ActorClass", "ActorHandle", "get_actor", "method"), ".core.actor"),
    **dict.fromkeys(("available_resources", "cancel", "cluster_resources", "get", "get_gpu_ids",
                     "get_runtime_context", "init", "is_initialized", "kill", "nodes", "put",
                     "remote", "shutdown", "timeline", "wait"), ".core.api"),
    **dict.fromkeys(("DynamicObjectRefGenerator", "ObjectRefGenerator"), ".core.generators"),
    "ObjectRef": ".core.object_ref",
    "ObjectID": ".core.object_ref",  # Ray's old name of ObjectRef
}
#: Submodules that are attributes as Ray's are (ray.actor, ray.exceptions...).
_SUBMODULES = ("actor", "exceptions", "job_config", "util")

__all__ = [
    "init", "shutdown", "is_initialized", "remote", "get", "put", "wait", "cancel", "kill",
    "get_actor", "method", "nodes", "cluster_resources", "available_resources",
    "get_runtime_context", "get_gpu_ids", "ObjectRef", "ObjectRefGenerator",
    "DynamicObjectRefGenerator", "ActorHandle", "ActorClass", "exceptions",
    "actor", "util", "timeline", "job_config", "ObjectID",
]


def __getattr__(name: str):
    source = _LAZY.get(name)
    if source is not None:
        module = _importlib.import_module(source, __name__)
        value = getattr(module, "ObjectRef" if name == "ObjectID" else name)
    elif name in _SUBMODULES:
        value = _importlib.import_module("." + name, __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # (the next use finds it without this call)
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
