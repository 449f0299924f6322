"""Ray program: init shutdown."""
# agreement: own-ray
import ray
ray.init(num_cpus=2)
print(ray.is_initialized())
ray.shutdown()
print(ray.is_initialized())
ray.init(num_cpus=1)
@ray.remote
def f():
    return 2
print(ray.get(f.remote()), ray.cluster_resources()["CPU"])
ray.shutdown()
