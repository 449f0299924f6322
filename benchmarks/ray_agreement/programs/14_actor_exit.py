"""Ray program: actor exit."""
import ray
ray.init(num_cpus=2)
@ray.remote
class A:
    def ping(self):
        return 1
    def leave(self):
        ray.actor.exit_actor()
a = A.remote()
ray.get(a.ping.remote())
try:
    ray.get(a.leave.remote(), timeout=30)
    print("returned")
except ray.exceptions.RayActorError as e:
    print("leave:", type(e).__name__)
try:
    ray.get(a.ping.remote(), timeout=30)
except ray.exceptions.ActorDiedError as e:
    print("ActorDiedError", "exit_actor" in str(e))
