"""Ray program: actor kill."""
import ray
ray.init(num_cpus=2)
@ray.remote
class A:
    def ping(self):
        return 1
a = A.remote()
ray.get(a.ping.remote())
ray.kill(a)
try:
    ray.get(a.ping.remote(), timeout=30)
except ray.exceptions.ActorDiedError as e:
    print("ActorDiedError", isinstance(e, ray.exceptions.RayActorError))
