"""Ray program: retry exceptions."""
import ray
ray.init(num_cpus=2)
@ray.remote
class Count:
    def __init__(self):
        self.n = 0
    def incr(self):
        self.n += 1
        return self.n
@ray.remote(max_retries=3, retry_exceptions=True)
def flaky(c):
    if ray.get(c.incr.remote()) < 3:
        raise IOError("again")
    return "ok"
c = Count.remote()
print(ray.get(flaky.remote(c)), ray.get(c.incr.remote()))
@ray.remote(max_retries=3, retry_exceptions=[KeyError])
def picky(c):
    ray.get(c.incr.remote())
    raise ValueError("not retried")
c2 = Count.remote()
try:
    ray.get(picky.remote(c2))
except ValueError:
    print("ValueError", ray.get(c2.incr.remote()))
