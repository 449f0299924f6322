"""Ray program: actor pool."""
import ray
ray.init(num_cpus=2)
from ray.util import ActorPool
@ray.remote
class W:
    def double(self, x):
        return 2 * x
pool = ActorPool([W.remote(), W.remote()])
print(list(pool.map(lambda a, v: a.double.remote(v), range(6))))
print(sorted(pool.map_unordered(lambda a, v: a.double.remote(v), range(6))))
pool.submit(lambda a, v: a.double.remote(v), 5)
pool.submit(lambda a, v: a.double.remote(v), 6)
print(pool.has_next(), pool.get_next(), pool.get_next(), pool.has_next())
print(pool.has_free())
