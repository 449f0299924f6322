"""Ray program: get bad input."""
import ray
ray.init(num_cpus=2)
for v in (1, "x", [1], None):
    try:
        ray.get(v)
        print("accepted")
    except Exception as e:
        print(type(e).__name__)
try:
    ray.wait([1])
except Exception as e:
    print(type(e).__name__)
try:
    ray.put(ray.put(1))
    print("put ref ok")
except Exception as e:
    print(type(e).__name__)
