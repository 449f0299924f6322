"""Ray program: decorator errors."""
import ray
ray.init(num_cpus=2)
for name, make in [
    ("empty parens", lambda: ray.remote()(lambda: 1)),
    ("bad option", lambda: ray.remote(num_cpu=1)),
    ("negative cpus", lambda: ray.remote(num_cpus=-1)),
    ("direct call", lambda: ray.remote(lambda: 1)()),
]:
    try:
        make()
        print(name, "ok")
    except Exception as e:
        print(name, type(e).__name__)
@ray.remote
def f():
    return 1
try:
    f()
except TypeError:
    print("direct TypeError")
