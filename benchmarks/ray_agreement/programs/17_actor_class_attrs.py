"""Ray program: actor class attrs."""
import ray
ray.init(num_cpus=2)
@ray.remote
class Counter:
    X = 41
    @staticmethod
    def helper():
        return 1
    def value(self):
        return Counter.X + Counter.helper()
c = Counter.remote()
print(ray.get(c.value.remote()))
try:
    class Sub(Counter):
        pass
    print("subclassed")
except TypeError:
    print("TypeError")
