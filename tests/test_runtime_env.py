"""``runtime_env``: its ``env_vars`` are honoured (for a task while it runs, for
an actor for its life, for the whole job from ``init``), and every other field
is refused with a clear error rather than silently ignored."""
from __future__ import annotations

import os

import pytest

import beamlet as ray

T = 30


@ray.remote(runtime_env={"env_vars": {"BEAMLET_TEST_VAR": "task"}})
def read_with_env(name="BEAMLET_TEST_VAR"):
    return os.environ.get(name)


@ray.remote
def read(name="BEAMLET_TEST_VAR"):
    return os.environ.get(name)


@ray.remote
class Reader:
    def read(self, name="BEAMLET_TEST_VAR"):
        return os.environ.get(name)


def test_env_vars_of_a_task_hold_while_it_runs(backend):
    assert ray.get([read_with_env.remote(), read.remote()], timeout=T) == ["task", None]
    other = read.options(runtime_env={"env_vars": {"BEAMLET_TEST_VAR": "options"}})
    assert ray.get([other.remote(), read.remote()], timeout=T) == ["options", None]
    assert "BEAMLET_TEST_VAR" not in os.environ


def test_env_vars_of_an_actor_hold_for_its_calls(backend):
    reader = Reader.options(runtime_env={"env_vars": {"BEAMLET_TEST_VAR": "actor"}}).remote()
    assert ray.get([reader.read.remote(), read.remote(), reader.read.remote()],
                   timeout=T) == ["actor", None, "actor"]
    # Actors without the variables, some of them in the first one's process where
    # actors share processes (dask, inprocess): none sees the variable.
    others = [Reader.remote() for _ in range(4)]
    assert ray.get([other.read.remote() for other in others], timeout=T) == [None] * 4


@pytest.mark.parametrize("name", ["inprocess", "local"])
def test_env_vars_of_the_job_apply_to_every_task_under_their_own(start_backend, name):
    start_backend(name, runtime_env={"env_vars": {"BEAMLET_TEST_VAR": "job",
                                                  "BEAMLET_TEST_OTHER": "job"}})

    @ray.remote
    def nested():
        return ray.get(read.remote("BEAMLET_TEST_OTHER"), timeout=T)

    assert ray.get([read.remote(), read_with_env.remote(), read.remote("BEAMLET_TEST_OTHER"),
                    read_with_env.remote("BEAMLET_TEST_OTHER"), nested.remote(),
                    Reader.remote().read.remote()], timeout=T) == \
        ["job", "task", "job", "job", "job", "job"]


def test_fields_other_than_env_vars_are_refused(backend):
    for field in ({"working_dir": "."}, {"pip": ["requests"]}, {"conda": "env"}):
        with pytest.raises(ValueError, match="not supported"):
            read.options(runtime_env=field)
        with pytest.raises(ValueError, match="not supported"):
            Reader.options(runtime_env=field)
    with pytest.raises(TypeError, match="str to str"):
        read.options(runtime_env={"env_vars": {"X": 1}})
    with pytest.raises(TypeError, match="must be a dict"):
        ray.remote(runtime_env="env")(lambda: 1)


@pytest.mark.parametrize("name", ["inprocess", "local"])
def test_init_refuses_unsupported_fields(no_backend, name):
    with pytest.raises(ValueError, match="'working_dir'"):
        ray.init(backend=name, num_cpus=1, runtime_env={"working_dir": "."})
    assert not ray.is_initialized()
