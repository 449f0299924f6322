"""Ray program: wrong arguments."""
import ray
ray.init(num_cpus=2)
@ray.remote
def f(a, b=1):
    return a + b
for call in (lambda: f.remote(), lambda: f.remote(1, 2, 3), lambda: f.remote(1, c=2)):
    try:
        call()
        print("accepted")
    except TypeError:
        print("TypeError")
@ray.remote
class A:
    def __init__(self, x):
        self.x = x
    def m(self, y):
        return self.x + y
try:
    A.remote()
    print("accepted")
except TypeError:
    print("TypeError")
a = A.remote(1)
try:
    a.m.remote()
    print("accepted")
except TypeError:
    print("TypeError")
print(ray.get(a.m.remote(2)))
