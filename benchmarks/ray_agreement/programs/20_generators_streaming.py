"""Ray program: generators streaming."""
import ray
ray.init(num_cpus=2)
@ray.remote
def gen(n):
    for i in range(n):
        yield i * 10
g = gen.remote(4)
print(type(g).__name__)
print([ray.get(r) for r in g])
@ray.remote
def gen_err():
    yield 1
    raise ValueError("mid")
vals = []
for r in gen_err.remote():
    try:
        vals.append(ray.get(r))
    except ValueError:
        vals.append("ValueError")
print(vals)
g = gen.options(num_returns="streaming").remote(2)
print(ray.get(next(g)), ray.get(next(g)))
try:
    next(g)
except StopIteration:
    print("StopIteration")
@ray.remote
class A:
    def items(self, n):
        for i in range(n):
            yield i
a = A.remote()
print([ray.get(r) for r in a.items.remote(3)])
