"""Ray program: wait fetch local."""
import ray
ray.init(num_cpus=2)
@ray.remote
def f():
    return 1
refs = [f.remote() for _ in range(4)]
ready, rest = ray.wait(refs, num_returns=4, timeout=30, fetch_local=False)
print(len(ready), len(rest))
ready, _ = ray.wait(refs, num_returns=2)
print(len(ready))
