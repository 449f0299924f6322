"""``init(job_config=JobConfig(...))`` (Ray's ``ray.job_config.JobConfig``):
its runtime_env, namespace, metadata and default actor lifetime apply to the
job; what beamlet cannot do is refused. Also ``ObjectID``, Ray's old name of
ObjectRef."""
from __future__ import annotations

import os

import pytest

import beamlet as ray
from beamlet.job_config import JobConfig
from conftest import own_init_options

T = 30


@ray.remote
def job_view():
    return os.environ.get("JOB_VAR"), ray.get_runtime_context().get_job_metadata()


@ray.remote
class Box:
    def ping(self):
        return "pong"


def test_job_config_applies_to_the_job(backend_name):
    config = JobConfig(runtime_env={"env_vars": {"JOB_VAR": "job"}}, metadata={"team": "a"},
                       ray_namespace="jobs", default_actor_lifetime="detached")
    ray.init(backend=backend_name, **own_init_options(backend_name), job_config=config)
    assert ray.get(job_view.remote(), timeout=T) == ("job", {"team": "a"})
    assert ray.get_runtime_context().get_job_metadata() == {"team": "a"}
    assert ray.get_runtime_context().namespace == "jobs"
    box = Box.options(name="box").remote()
    assert ray.get(box.ping.remote(), timeout=T) == "pong"
    del box  # detached by default now: it outlives its handles
    assert ray.get(ray.get_actor("box").ping.remote(), timeout=T) == "pong"


def test_init_arguments_win_over_the_job_config(backend_name):
    config = JobConfig(runtime_env={"env_vars": {"JOB_VAR": "job"}})
    ray.init(backend=backend_name, **own_init_options(backend_name), job_config=config,
             runtime_env={"env_vars": {"JOB_VAR": "init"}})
    assert ray.get(job_view.remote(), timeout=T) == ("init", {})


def test_what_beamlet_cannot_do_is_refused(no_backend):
    with pytest.raises(ValueError, match="jvm_options"):
        JobConfig(jvm_options=["-Xmx1g"])
    with pytest.raises(ValueError, match="code_search_path"):
        JobConfig(code_search_path=["/somewhere"])
    with pytest.raises(ValueError, match="default_actor_lifetime"):
        JobConfig(default_actor_lifetime="forever")
    with pytest.raises(ValueError, match="working_dir"):
        JobConfig(runtime_env={"working_dir": "."})
    with pytest.raises(TypeError, match="metadata"):
        JobConfig(metadata={"n": 1})
    with pytest.raises(TypeError, match="JobConfig"):
        ray.init(backend="inprocess", job_config={"metadata": {}})
    with pytest.raises(ValueError, match="disagree"):
        ray.init(backend="inprocess", namespace="a", job_config=JobConfig(ray_namespace="b"))


def test_object_id_is_object_ref():
    assert ray.ObjectID is ray.ObjectRef
