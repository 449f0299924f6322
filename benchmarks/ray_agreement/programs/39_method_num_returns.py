"""Ray program: method num returns."""
import ray
ray.init(num_cpus=2)
@ray.remote
class A:
    @ray.method(num_returns=2)
    def pair(self):
        return 1, 2
    def triple(self):
        return 1, 2, 3
a = A.remote()
x, y = a.pair.remote()
print(ray.get([x, y]))
refs = a.triple.options(num_returns=3).remote()
print(ray.get(list(refs)))
