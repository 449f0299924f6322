"""beamlet: Python functions as tasks and classes as actors, across processes
and machines, with Ray's programming model and pluggable backends.

    import beamlet as ray
    ray.init()                      # backend="local" | "inprocess" | a plugin's

    @ray.remote
    def square(x):
        return x * x

    ray.get([square.remote(i) for i in range(4)])   # [0, 1, 4, 9]
"""
from . import actor, exceptions, job_config, util  # Ray's ray.actor, ray.exceptions...
from .core.actor import ActorClass, ActorHandle, get_actor, method
from .core.api import (available_resources, cancel, cluster_resources, get, get_gpu_ids,
                       get_runtime_context, init, is_initialized, kill, nodes, put, remote,
                       shutdown, timeline, wait)
from .core.generators import DynamicObjectRefGenerator, ObjectRefGenerator
from .core.object_ref import ObjectRef

#: Ray's old name of ObjectRef.
ObjectID = ObjectRef

__version__ = "0.1.0"

__all__ = [
    "init", "shutdown", "is_initialized", "remote", "get", "put", "wait", "cancel", "kill",
    "get_actor", "method", "nodes", "cluster_resources", "available_resources",
    "get_runtime_context", "get_gpu_ids", "ObjectRef", "ObjectRefGenerator",
    "DynamicObjectRefGenerator", "ActorHandle", "ActorClass", "exceptions",
    "actor", "util", "timeline", "job_config", "ObjectID",
]
