"""Ray program: runtime env vars."""
import ray
ray.init(num_cpus=2)
import os
@ray.remote(runtime_env={"env_vars": {"FOO": "bar"}})
def f():
    return os.environ.get("FOO")
@ray.remote
def g():
    return os.environ.get("FOO")
print(ray.get(f.remote()), ray.get(g.remote()))
print(ray.get(g.options(runtime_env={"env_vars": {"FOO": "opt"}}).remote()))
