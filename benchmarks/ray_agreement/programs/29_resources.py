"""Ray program: resources."""
import ray
ray.init(num_cpus=2)
print(ray.cluster_resources()["CPU"])
@ray.remote(num_cpus=1)
def f():
    return ray.get_runtime_context().get_assigned_resources()
print(ray.get(f.remote()))
print(ray.is_initialized())
print(len(ray.nodes()), ray.nodes()[0]["Alive"])
@ray.remote(resources={"custom": 1})
def g():
    return 1
print("custom" in ray.cluster_resources())
