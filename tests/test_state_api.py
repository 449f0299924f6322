"""Introspection, as Ray's ``ray.util.state`` and ``ray.timeline``: the job's
tasks, actors, objects and workers, and a Chrome trace of its task attempts,
fed by the lifecycle hooks. On backends without the ``task_events`` flag each
call is a clear NotImplementedError."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import beamlet as ray
from beamlet.util import state
from conftest import own_init_options

T = 60


@ray.remote
def pid_of(x):
    return os.getpid(), x


@ray.remote
def fails():
    raise ValueError("on purpose")


@ray.remote
class Gate:
    """Holds a task back until opened (no timing involved)."""

    def __init__(self):
        self.open = False

    def set_open(self):
        self.open = True

    def is_open(self):
        return self.open


@ray.remote
def waits_for(gate):
    import time
    deadline = time.monotonic() + T
    while not ray.get(gate.is_open.remote(), timeout=T):
        if time.monotonic() > deadline:
            raise TimeoutError("the gate never opened")
        time.sleep(0.01)
    return "through"


@ray.remote
class Named:
    def pid(self):
        return os.getpid()


def test_every_call_says_when_the_backend_cannot_tell(backend):
    if backend.task_events:
        assert isinstance(state.list_tasks(), list)
        return
    for call in (state.list_tasks, state.list_actors, state.list_objects, state.list_workers,
                 state.summarize_tasks, ray.timeline):
        with pytest.raises(NotImplementedError, match=backend.name):
            call()


def test_tasks_are_listed_with_their_outcome_and_the_process_that_ran_them(backend):
    backend.require("task_events")
    ran = ray.get([pid_of.remote(i) for i in range(4)], timeout=T)
    bad = fails.remote()
    with pytest.raises(ValueError):
        ray.get(bad, timeout=T)
    rows = state.list_tasks(filters=[("name", "=", "pid_of")])
    assert len(rows) == 4
    assert {r.state for r in rows} == {"FINISHED"}
    assert {r.type for r in rows} == {"NORMAL_TASK"}
    assert {r.worker_pid for r in rows} == {pid for pid, _ in ran}
    assert all(r.creation_time_ms <= r.start_time_ms <= r.end_time_ms for r in rows)
    (failed,) = state.list_tasks(filters=[("state", "=", "FAILED")])
    assert failed.name == "fails" and failed["state"] == "FAILED"  # (also read as a dict)
    assert state.get_task(failed.task_id) == failed
    assert state.summarize_tasks() == {"pid_of": {"FINISHED": 4}, "fails": {"FAILED": 1}}
    assert len(state.list_tasks(limit=2)) == 2
    assert len(state.list_tasks(filters=[("state", "!=", "FINISHED")])) == 1


@ray.remote
def waits_for_file(path, *_after):
    import time
    deadline = time.monotonic() + T
    while not os.path.exists(path):  # (no get: a task blocked in get lends its CPU)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.01)
    return "through"


@ray.remote
class Worker:
    def block(self, path):
        return ray.get(waits_for_file.remote(path), timeout=T)

    def quick(self):
        return "quick"


def _states(name: str) -> list[str]:
    return [r.state for r in state.list_tasks(filters=[("name", "=", name)])]


def _wait_for_state(name: str, wanted: str) -> None:
    import time
    deadline = time.monotonic() + T
    while _states(name) != [wanted]:
        assert time.monotonic() < deadline, f"{name} stayed {_states(name)}"
        time.sleep(0.01)


def test_queued_and_running_tasks_are_told_apart_as_in_ray(backend, tmp_path):
    backend.require("task_events", "parallel")
    path = str(tmp_path / "open")
    running = waits_for_file.remote(path)
    _wait_for_state("waits_for_file", "RUNNING")
    after = pid_of.remote(running)  # its argument is being computed
    everything = ray.cluster_resources()["CPU"]
    queued = fails.options(num_cpus=everything).remote()  # a CPU is held by `running`
    actor = Worker.remote()
    blocked = actor.block.remote(path)
    _wait_for_state("Worker.block", "RUNNING")
    behind = actor.quick.remote()
    _wait_for_state("Worker.quick", "SUBMITTED_TO_WORKER")
    assert (_states("pid_of"), _states("fails")) == \
        (["PENDING_ARGS_AVAIL"], ["PENDING_NODE_ASSIGNMENT"])
    (row,) = state.list_tasks(filters=[("name", "=", "waits_for_file")], limit=1)
    assert row.start_time_ms is not None and row.end_time_ms is None and row.worker_pid
    open(path, "w").close()
    assert ray.get([running, blocked, behind], timeout=T) == ["through", "through", "quick"]
    ray.get(after, timeout=T)
    with pytest.raises(ValueError):
        ray.get(queued, timeout=T)
    assert _states("pid_of") == ["FINISHED"] and _states("fails") == ["FAILED"]
    assert _states("Worker.quick") == ["FINISHED"]
    (row,) = state.list_tasks(filters=[("name", "=", "waits_for_file")], limit=1)
    assert row.state == "FINISHED" and row.end_time_ms >= row.start_time_ms


def test_a_cancelled_task_is_failed_with_its_error_type(backend, tmp_path):
    backend.require("task_events", "parallel")
    ref = waits_for_file.remote(str(tmp_path / "never"))
    _wait_for_state("waits_for_file", "RUNNING")
    ray.cancel(ref, force=True)
    with pytest.raises(ray.exceptions.TaskCancelledError):
        ray.get(ref, timeout=T)
    (row,) = state.list_tasks(filters=[("name", "=", "waits_for_file")])
    assert (row.state, row.error_type) == ("FAILED", "TASK_CANCELLED")


@ray.remote(max_retries=2, retry_exceptions=True)
def flaky(path):
    if not os.path.exists(path):
        open(path, "w").close()
        raise RuntimeError("first attempt fails")
    return "ok"


def test_a_retried_task_counts_its_attempts(backend, tmp_path):
    backend.require("task_events")
    marker = str(tmp_path / "failed-once")
    assert ray.get(flaky.remote(marker), timeout=T) == "ok"
    (row,) = state.list_tasks(filters=[("name", "=", "flaky")])
    assert (row.state, row.attempt_number) == ("FINISHED", 1)


def test_actors_are_listed_alive_then_dead_with_the_cause(backend):
    backend.require("task_events")
    actor = Named.options(name="listed", namespace="ns-state").remote()
    pid = ray.get(actor.pid.remote(), timeout=T)
    (row,) = state.list_actors(filters=[("name", "=", "listed")])
    assert (row.class_name, row.state, row.ray_namespace, row.pid) == \
        ("Named", "ALIVE", "ns-state", pid)
    assert state.get_actor(row.actor_id) == row
    calls = state.list_tasks(filters=[("actor_id", "=", row.actor_id)])
    assert sorted(r.type for r in calls) == ["ACTOR_CREATION_TASK", "ACTOR_TASK"]
    ray.kill(actor)
    with pytest.raises(ray.exceptions.ActorDiedError):
        ray.get(actor.pid.remote(), timeout=T)
    (row,) = state.list_actors(filters=[("name", "=", "listed")])
    assert row.state == "DEAD" and "kill" in row.death_cause


def test_objects_held_by_the_driver_are_listed_with_their_size(backend):
    backend.require("task_events")
    ref = ray.put(np.zeros(1 << 20, dtype=np.uint8))
    extra = ref  # a second Python name is still one reference held by the driver
    (row,) = state.list_objects(filters=[("object_id", "=", ref.hex())])
    assert row.ready and row.object_size >= 1 << 20 and row.ref_count >= 1
    object_id = ref.hex()
    del ref, extra
    assert state.list_objects(filters=[("object_id", "=", object_id)]) == []


def test_workers_are_the_driver_and_the_processes_tasks_ran_in(backend):
    backend.require("task_events")
    task_pid, _ = ray.get(pid_of.remote(0), timeout=T)
    rows = state.list_workers(limit=1000)
    (driver,) = [r for r in rows if r.worker_type == "DRIVER"]
    assert driver.pid == os.getpid() and driver.is_alive
    assert task_pid in {r.pid for r in rows}
    if backend.isolated:
        assert task_pid != os.getpid()
        assert any(r.worker_type == "WORKER" and r.pid == task_pid for r in rows)


def test_the_record_is_bounded(backend_name, monkeypatch):
    monkeypatch.setenv("BEAMLET_STATE_MAX_TASKS", "50")
    ray.init(backend=backend_name, **own_init_options(backend_name))
    if not _runtime_has_events():
        pytest.skip(f"needs a backend with task_events; {backend_name!r} has none")
    ray.get([pid_of.remote(i) for i in range(200)], timeout=T)
    rows = state.list_tasks(limit=1000)
    assert len(rows) == 50
    assert state.summarize_tasks() == {"pid_of": {"FINISHED": 50}}


def _runtime_has_events() -> bool:
    from beamlet.core import runtime
    return runtime.current().task_events is not None


def test_bad_filters_and_limits_name_the_problem(backend):
    backend.require("task_events")
    with pytest.raises(ValueError, match="cannot filter TaskState on 'colour'"):
        state.list_tasks(filters=[("colour", "=", "red")])
    with pytest.raises(ValueError, match="predicate"):
        state.list_tasks(filters=[("state", "~", "FAILED")])
    with pytest.raises(ValueError, match="limit"):
        state.list_actors(limit=0)
    with pytest.raises(ValueError, match="no state server"):
        state.list_workers(address="127.0.0.1:6379")


def test_shutdown_stops_the_record_listening(backend_name):
    from beamlet.core import plugins
    before = {hook: len(fns) for hook, fns in plugins._listeners.items()}
    for _ in range(3):
        ray.init(backend=backend_name, **own_init_options(backend_name))
        ray.shutdown()
    assert {hook: len(fns) for hook, fns in plugins._listeners.items()} == before


def test_without_init_it_says_to_call_init(no_backend):
    with pytest.raises(RuntimeError, match="init"):
        state.list_tasks()
    with pytest.raises(RuntimeError, match="init"):
        ray.timeline()


def test_the_timeline_has_one_event_per_attempt_on_its_process_row(backend, tmp_path):
    backend.require("task_events")
    ran = ray.get([pid_of.remote(i) for i in range(3)], timeout=T)
    with pytest.raises(ValueError):
        ray.get(fails.remote(), timeout=T)
    events = ray.timeline()
    spans = [e for e in events if e["ph"] == "X"]
    mine = [e for e in spans if e["name"] == "pid_of"]
    assert len(mine) == 3 and {e["pid"] for e in mine} == {pid for pid, _ in ran}
    assert all(e["dur"] >= 0 and e["ts"] > 0 for e in spans)
    (failed,) = [e for e in spans if e["name"] == "fails"]
    assert failed["args"]["status"] == "FAILED"
    rows = {e["pid"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert {e["pid"] for e in spans} <= rows
    path = tmp_path / "trace.json"
    assert ray.timeline(str(path)) is None
    assert json.loads(path.read_text()) == ray.timeline()


PROGRAM = """
import beamlet as ray

@ray.remote
def square(x):
    return x * x

ray.init(backend={backend!r}, num_cpus=2)
print(sum(ray.get([square.remote(i) for i in range(5)], timeout=60)))
"""


def test_the_timeline_command_runs_a_program_and_writes_its_trace(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(PROGRAM.format(backend="local"))
    trace = tmp_path / "out" / "trace.json"
    trace.parent.mkdir()
    proc = subprocess.run([sys.executable, "-m", "beamlet.cli", "timeline", str(trace), str(script)],
                          capture_output=True, text=True, timeout=T, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "30"
    events = json.loads(trace.read_text())
    assert sorted(e["name"] for e in events if e["ph"] == "X") == ["square"] * 5
    # A program that starts no beamlet job writes nothing, and says so.
    idle = tmp_path / "idle.py"
    idle.write_text("print('nothing')\n")
    proc = subprocess.run([sys.executable, "-m", "beamlet.cli", "timeline", str(trace), str(idle)],
                          capture_output=True, text=True, timeout=T, cwd=tmp_path)
    assert proc.returncode != 0 and "nothing written" in proc.stderr
    assert not trace.exists()
