"""Ray program: exceptions hierarchy."""
import ray
ray.init(num_cpus=2)
E = ray.exceptions
print(issubclass(E.GetTimeoutError, TimeoutError))
print(issubclass(E.RayTaskError, E.RayError))
print(issubclass(E.ActorDiedError, E.RayActorError))
print(issubclass(E.TaskCancelledError, E.RayError))
print(issubclass(E.WorkerCrashedError, E.RayError))
print(issubclass(E.ObjectLostError, E.RayError))
print(issubclass(E.OwnerDiedError, E.ObjectLostError))
print(issubclass(E.ActorUnavailableError, E.RayActorError))
print(all(hasattr(E, n) for n in ["ObjectFreedError", "ObjectRefStreamEndOfStreamError", "AsyncioActorExit", "TaskPlacementGroupRemoved", "ActorPlacementGroupRemoved", "RuntimeEnvSetupError", "OutOfMemoryError", "ObjectStoreFullError", "RaySystemError", "LocalRayletDiedError", "NodeDiedError", "PendingCallsLimitExceeded"]))
