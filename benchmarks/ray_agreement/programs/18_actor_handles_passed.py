"""Ray program: actor handles passed."""
import ray
ray.init(num_cpus=2)
@ray.remote
class Store:
    def __init__(self):
        self.items = []
    def add(self, x):
        self.items.append(x)
    def all(self):
        return sorted(self.items)
@ray.remote
def writer(store, i):
    ray.get(store.add.remote(i))
    return i
s = Store.remote()
ray.get([writer.remote(s, i) for i in range(4)])
print(ray.get(s.all.remote()))
@ray.remote
class Caller:
    def call(self, store):
        return ray.get(store.all.remote())
print(ray.get(Caller.remote().call.remote(s)))
