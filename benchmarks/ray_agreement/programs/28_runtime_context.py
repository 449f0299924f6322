"""Ray program: runtime context."""
import ray
ray.init(num_cpus=2)
ctx = ray.get_runtime_context()
print(isinstance(ctx.get_job_id(), str), ctx.get_task_id() is None, ctx.get_actor_id() is None)
@ray.remote
def t():
    c = ray.get_runtime_context()
    return isinstance(c.get_task_id(), str), c.get_actor_id() is None
print(ray.get(t.remote()))
@ray.remote
class A:
    def ids(self):
        c = ray.get_runtime_context()
        return isinstance(c.get_actor_id(), str), c.was_current_actor_reconstructed, c.get_actor_name()
print(ray.get(A.options(name="n1").remote().ids.remote()))
print(isinstance(ctx.get_node_id(), str), ctx.namespace is not None)
