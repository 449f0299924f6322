"""Ray program: job config."""
# agreement: own-ray
import ray
ray.init(num_cpus=2)
import ray
ray.shutdown()
ray.init(num_cpus=2, job_config=ray.job_config.JobConfig(metadata={"k": "v"}))
print(ray.get_runtime_context().get_job_metadata() if hasattr(ray.get_runtime_context(), "get_job_metadata") else "n/a")
