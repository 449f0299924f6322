"""Ray program: actor ordering."""
import ray
ray.init(num_cpus=2)
@ray.remote
class Log:
    def __init__(self):
        self.items = []
    def add(self, x):
        self.items.append(x)
    def get(self):
        return self.items
l = Log.remote()
for i in range(50):
    l.add.remote(i)
print(ray.get(l.get.remote()) == list(range(50)))
