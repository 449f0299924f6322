"""What the ``ray`` backend does, against a real local Ray: one beamlet session
(``init(backend="ray")``, which starts Ray) serves the module, and the last
test shuts it down and checks that no process of that Ray is left. The
semantic suite runs on ``ray`` too, on a shared Ray of its own (conftest.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import procs

import beamlet as ray
from beamlet import exceptions as exc
from beamlet.core import runtime as _runtime

# One worker runs this module under pytest-xdist, so that it starts one Ray (the
# module's session), not one in each worker that takes a test of it.
pytestmark = pytest.mark.xdist_group("ray_backend_session")

T = 60  # every blocking call's timeout
GONE_TIMEOUT = 30
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def _cmdline_mentions(pid: int, text: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return text.encode() in f.read()
    except OSError:
        return False


def _descendants() -> set[int]:
    tree = _children()
    found, todo = set(), [os.getpid()]
    while todo:
        for child in tree.get(todo.pop(), ()):
            found.add(child)
            todo.append(child)
    return found


def ray_processes(temp_dir: str, before: set[int]) -> set[int]:
    """The processes of the Ray this test process started: its descendants not
    there `before` it started Ray, and any process whose command line names
    the session's temp dir (Ray passes it to every process of the session)."""
    found = _descendants() - before
    found.update(int(p) for p in os.listdir("/proc") if p.isdigit() and
                 _cmdline_mentions(int(p), temp_dir))
    found.discard(os.getpid())
    return found




@pytest.fixture(scope="module")
def session():
    """One beamlet session on a Ray it started (2 CPUs, a custom resource)."""
    from conftest import _ray_cluster
    ray.shutdown()
    _ray_cluster.disconnect()  # (the semantic suite's connection, if it ran before)
    saved_backend = os.environ.pop("BEAMLET_BACKEND", None)
    before = _descendants()  # (other tests' processes: a shared cluster, say)
    ray.init(backend="ray", num_cpus=2, resources={"disk": 2}, task_events=True)
    backend = _runtime.current().backend
    backend.test_processes_before = before
    yield backend
    ray.shutdown()
    if saved_backend is not None:
        os.environ["BEAMLET_BACKEND"] = saved_backend


# -- module-level functions (importable by Ray workers) ---------------------------

@ray.remote
def square(x):
    return x * x


@ray.remote
def total_of_squares(n):
    return sum(ray.get([square.remote(i) for i in range(n)], timeout=T))


@ray.remote
def first_of(refs):
    return ray.get(refs[0], timeout=T)


@ray.remote
def fail(message):
    raise KeyError(message)


@ray.remote
def make_ref(value):
    return [ray.put(value)]


@ray.remote
def sleep_in_steps(path, seconds):
    open(path, "w").close()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:  # (Ray's cancel interrupts between bytecodes)
        time.sleep(0.05)
    return "finished"


@ray.remote
def sleep_through(path, seconds):
    open(path, "w").close()
    time.sleep(seconds)  # (one system call: no bytecode runs until it returns)
    return "finished"


@ray.remote
def pid():
    return os.getpid()


@ray.remote
class Counter:
    def __init__(self, start=0):
        self.value = start

    def add(self, n=1):
        self.value += n
        return self.value

    def pid(self):
        return os.getpid()


@ray.remote
def add_through(counter, n):
    return ray.get(counter.add.remote(n), timeout=T)


@ray.remote
def views_of(a, refs):
    """Whether the argument `a` and a get of ``refs[0]`` here (the same object)
    are views of the same memory (Ray's store), not copies; whether `a` may
    be written to; its sum."""
    again = ray.get(refs[0], timeout=T)
    return bool(np.shares_memory(a, again)), bool(a.flags.writeable), float(a.sum())


@ray.remote
def make_array(n):
    return np.arange(n, dtype=np.float64)


# -- tests ---------------------------------------------------------------------------

def test_importing_beamlet_and_listing_backends_does_not_import_ray():
    code = ("import sys, beamlet, beamlet.cli; beamlet.cli.main(['backends']);"
            "from beamlet.core import plugins; from beamlet.backends.ray import plugin;"
            "assert 'ray' in plugins.backend_factories();"
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=T, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout


NOT_CONNECTED = """if True:
    import json, os, ray
    from beamlet.backends.ray import control, threads

    calls = {
        "get_actor": lambda: ray.get_actor("beamlet-control", namespace="beamlet"),
        "get": lambda: ray.get([], timeout=1),
        "wait": lambda: ray.wait([], timeout=1),
        "put": lambda: ray.put(1),
        "get_runtime_context": ray.get_runtime_context,
        "list_named_actors": lambda: ray.util.list_named_actors(all_namespaces=True),
        "get_current_placement_group": ray.util.get_current_placement_group,
        "get_placement_group": lambda: ray.util.get_placement_group("none"),
    }
    said = {}

    def call_each():
        for name, call in calls.items():
            try:
                call()
                said[name] = "returned"
            except threads.RayNotConnected:
                said[name] = "refused"

    threads.start(call_each, name="probe").join(60)
    try:  # (where a worker's calls to the control actor go)
        control.on_control_thread(ray.get_actor, "beamlet-control", timeout=60)
        said["on the control thread"] = "returned"
    except threads.RayNotConnected:
        said["on the control thread"] = "refused"
    children = [pid for task in os.listdir(f"/proc/{os.getpid()}/task")
                for pid in open(f"/proc/{os.getpid()}/task/{task}/children").read().split()]
    print(json.dumps([said, ray.is_initialized(), children]))
"""


def test_beamlets_threads_never_start_a_ray():
    """Ray's API starts a local Ray when called in a process not connected to
    one. On beamlet's own threads (control.py's, the task events', the pub/sub
    poller) a call after the program's ``ray.shutdown()`` would so start a Ray
    owned by that thread: its processes die with the thread, and about 60 s
    later Ray's client ends the whole process. There such calls raise instead
    (checked here against the installed Ray's API, in a process never connected)."""
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", NOT_CONNECTED], capture_output=True, text=True,
                          timeout=2 * T, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    said, initialized, children = json.loads(proc.stdout.strip().splitlines()[-1])
    assert said == {name: "refused" for name in said} and len(said) == 9, said
    assert initialized is False and children == [], (initialized, children)


ANOTHER_BACKEND_AFTER_RAY = """if True:
    import json, beamlet, ray
    from beamlet.backends.ray import events
    from beamlet.core import plugins

    class Observer:  # (so that the dask driver hears each task's end)
        @plugins.hookimpl
        def beamlet_task_finished(self, spec, status):
            pass

    sender = events.sender()  # (as a Ray session made it: it listens for the process's life)
    plugins.register(Observer())
    beamlet.init(backend="dask", num_cpus=1)
    inc = beamlet.remote(lambda x: x + 1)
    assert beamlet.get([inc.remote(i) for i in range(3)], timeout=60) == [1, 2, 3]
    beamlet.shutdown()  # (once the observers heard every end)
    print(json.dumps([ray.is_initialized(), len(sender._buffer)]))
"""


def test_the_ray_event_listener_ignores_a_later_session_on_another_backend():
    """The Ray backend's listener for task ends stays for the life of the
    process. A later session on dask in that process, whose observers hear
    ends on a thread of its own, must not reach it: it would call Ray there,
    which started a Ray owned by that thread (an xdist worker then died 60 s
    after the thread ended, in CI, running a dask test after Ray's)."""
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", ANOTHER_BACKEND_AFTER_RAY],
                          capture_output=True, text=True, timeout=4 * T, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    initialized, told = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (initialized, told) == (False, 0), proc.stderr[-3000:]


def test_tasks_run_in_ray_workers_with_their_resources(session):
    assert ray.get(square.remote(7), timeout=T) == 49
    assert ray.cluster_resources()["CPU"] == 2.0
    assert ray.cluster_resources()["disk"] == 2.0
    assert ray.get(pid.options(resources={"disk": 2}).remote(), timeout=T) != os.getpid()
    with pytest.raises(ValueError, match="disk"):
        pid.options(resources={"disk": 3}).remote()
    with pytest.raises(ValueError, match="tape"):
        pid.options(resources={"tape": 1}).remote()


def test_nested_tasks_and_refs_as_arguments(session):
    assert ray.get(total_of_squares.remote(5), timeout=T) == 30
    ref = ray.put(6)
    assert ray.get(square.remote(ref), timeout=T) == 36  # resolved on the worker
    assert ray.get(first_of.remote([ref]), timeout=T) == 6  # a nested ref stays a ref
    inner = ray.get(make_ref.remote("made in a worker"), timeout=T)[0]
    assert ray.get(inner, timeout=T) == "made in a worker"


def test_put_get_and_wait_with_timeouts(session, tmp_path):
    assert ray.get(ray.put({"a": [1, 2]}), timeout=T) == {"a": [1, 2]}
    slow = sleep_in_steps.remote(str(tmp_path / "started"), 30)
    with pytest.raises(exc.GetTimeoutError):
        ray.get(slow, timeout=0.2)
    fast = square.remote(3)
    ready, not_ready = ray.wait([slow, fast], num_returns=1, timeout=T)
    assert ready == [fast] and not_ready == [slow]
    assert ray.wait([slow], timeout=0.2) == ([], [slow])
    ray.cancel(slow, force=True)


def test_arrays_are_read_back_as_read_only_views_of_rays_store(session):
    big = np.arange(500_000, dtype=np.float64)  # 4 MB: past the inline threshold
    ref = ray.put(big)
    big[0] = -1.0  # (put copied it into Ray's store: this changes nothing stored)
    out = ray.get(ref, timeout=T)
    assert out[0] == 0.0 and out[-1] == 499_999.0 and not np.shares_memory(out, big)
    # Zero-copy, as Ray's own get: two gets are views of the one stored object.
    assert not out.flags.writeable and np.shares_memory(out, ray.get(ref, timeout=T))
    with pytest.raises(ValueError):
        out[1] = 5.0
    # In a task too: its argument, resolved by Ray, and a get of the same object.
    assert ray.get(views_of.remote(ref, [ref]), timeout=T) == (True, False, float(out.sum()))
    made = make_array.remote(500_000)
    first = ray.get(made, timeout=T)
    assert first[-1] == 499_999.0 and np.shares_memory(first, ray.get(made, timeout=T))
    # A large argument by value is stored once and passed by ref (zero_copy).
    assert ray.get(views_of.remote(big, [ref]), timeout=T)[1:] == (False, float(big.sum()))


def test_an_error_arrives_as_a_task_error_with_its_cause(session):
    with pytest.raises(KeyError) as info:
        ray.get(fail.remote("no such key"), timeout=T)
    assert isinstance(info.value, exc.TaskError)
    assert isinstance(info.value.cause, KeyError)
    assert "no such key" in str(info.value)
    with pytest.raises(KeyError):  # a failed argument fails the task that uses it
        ray.get(square.remote(fail.remote("upstream")), timeout=T)


def test_actors_keep_state_in_order_and_can_be_passed(session):
    counter = Counter.remote(10)
    assert ray.get([counter.add.remote() for _ in range(20)], timeout=T) == list(range(11, 31))
    assert ray.get(add_through.remote(counter, 5), timeout=T) == 35  # a handle as an argument
    assert ray.get(counter.pid.remote(), timeout=T) != os.getpid()


def test_named_actor_lookup_in_its_namespace(session):
    counter = Counter.options(name="tally", namespace="books").remote()
    ray.get(counter.add.remote(2), timeout=T)
    found = ray.get_actor("tally", namespace="books")
    assert ray.get(found.add.remote(1), timeout=T) == 3
    with pytest.raises(ValueError):
        ray.get_actor("tally", namespace="elsewhere")
    with pytest.raises(exc.ActorAlreadyExistsError):
        Counter.options(name="tally", namespace="books").remote()
    ray.kill(counter)
    with pytest.raises(ValueError):  # a dead actor's name is free
        ray.get_actor("tally", namespace="books")


def test_killed_actor_raises_actor_died(session):
    counter = Counter.remote()
    actor_pid = ray.get(counter.pid.remote(), timeout=T)
    ray.kill(counter)
    with pytest.raises(exc.ActorDiedError):
        ray.get(counter.add.remote(), timeout=T)
    assert procs.wait_gone([actor_pid], GONE_TIMEOUT) == []


def _restarted(counter, first: int):
    """Kill the process (pid `first`) of `counter`, whose restart is left; the
    pid of its next process, once it answers."""
    ray.kill(counter, no_restart=False)
    procs.eventually(lambda: not procs.alive(procs.proc_id(first)), "the first worker's end", T)
    second = None
    deadline = time.monotonic() + T
    while second is None and time.monotonic() < deadline:
        try:
            second = ray.get(counter.pid.remote(), timeout=T)
        except exc.ActorUnavailableError:  # (Ray: restarting)
            time.sleep(0.1)
    return second


def test_actor_restarts_after_its_process_dies(session):
    counter = Counter.options(max_restarts=1).remote(100)
    first = ray.get(counter.pid.remote(), timeout=T)
    second = _restarted(counter, first)
    assert second != first
    assert ray.get(counter.add.remote(), timeout=T) == 101  # constructed again


def test_cancel_running_queued_and_forced(session, tmp_path):
    running = sleep_in_steps.remote(str(tmp_path / "running"), 60)
    procs.eventually(lambda: (tmp_path / "running").exists(), "the task's start", T)
    ray.cancel(running)
    with pytest.raises(exc.TaskCancelledError):
        ray.get(running, timeout=T)

    hog = sleep_in_steps.options(num_cpus=2).remote(str(tmp_path / "hog"), 60)
    procs.eventually(lambda: (tmp_path / "hog").exists(), "the hog's start", T)
    queued = square.options(num_cpus=2).remote(3)
    ray.cancel(queued)
    with pytest.raises(exc.TaskCancelledError) as info:
        ray.get(queued, timeout=T)
    assert not isinstance(info.value, exc.TaskError)  # it never started
    ray.cancel(hog, force=True)
    with pytest.raises(exc.TaskCancelledError):
        ray.get(hog, timeout=T)
    assert ray.get(square.remote(4), timeout=T) == 16  # Ray carries on


def test_cancel_wakes_a_task_blocked_in_a_system_call(session, tmp_path):
    """Ray's cancel interrupts a running task between bytecodes, so one blocked
    in ``time.sleep(300)`` would run on until the sleep ends; beamlet's is
    prompt. (The plain-call path: test_plain_calls_without_task_events.)"""
    running = sleep_through.remote(str(tmp_path / "running"), 300)
    procs.eventually(lambda: (tmp_path / "running").exists(), "the task's start", T)
    ray.cancel(running)
    with pytest.raises(exc.TaskCancelledError):
        ray.get(running, timeout=T / 2)  # (a deadline far before the sleep's end)
    assert ray.get(square.remote(5), timeout=T) == 25  # the worker serves on


# (Functions of their own: the record holds the module session's every task.)
@ray.remote
def listed_pid():
    return os.getpid()


@ray.remote
def listed_fail():
    raise KeyError("recorded")


@ray.remote
def listed_sleep(path):
    open(path, "w").close()
    while True:
        time.sleep(0.05)


@ray.remote
def listed_child(x):
    return x * x


@ray.remote
def listed_parent(n):
    return sum(ray.get([listed_child.remote(i) for i in range(n)], timeout=T))


def test_the_state_api_sees_the_jobs_tasks_nested_ones_too(session, tmp_path):
    """``task_events`` on ray: the driver's record holds the end of each task
    whose result it has as soon as it has it (workers send their events later
    than the results: the read waits for them), and the tasks that tasks
    submit, as their workers send them."""
    from beamlet.util import state
    ran = {ray.get(listed_pid.remote(), timeout=T) for _ in range(3)}  # (refs dropped)
    rows = state.list_tasks(filters=[("name", "=", "listed_pid")])
    assert [r.state for r in rows] == ["FINISHED"] * 3
    assert {r.worker_pid for r in rows} == ran and os.getpid() not in ran
    workers = state.list_workers(limit=1000)
    assert {"DRIVER", "WORKER"} == {w.worker_type for w in workers}
    assert ran <= {w.pid for w in workers if w.worker_type == "WORKER" and w.is_alive}
    spans = [e for e in ray.timeline() if e["ph"] == "X" and e["name"] == "listed_pid"]
    assert {e["pid"] for e in spans} == ran
    with pytest.raises(KeyError):
        ray.get(listed_fail.remote(), timeout=T)
    (failed,) = state.list_tasks(filters=[("name", "=", "listed_fail")])
    assert failed.state == "FAILED" and failed.start_time_ms <= failed.end_time_ms

    hog = listed_sleep.remote(str(tmp_path / "hog"))
    procs.eventually(lambda: (tmp_path / "hog").exists(), "the hog's start", T)
    ray.cancel(hog, force=True)  # (its worker is killed: only Ray tells of its end)
    with pytest.raises(exc.TaskCancelledError):
        ray.get(hog, timeout=T)
    (row,) = state.list_tasks(filters=[("name", "=", "listed_sleep")])
    assert (row.state, row.error_type) == ("FAILED", "TASK_CANCELLED")

    assert ray.get(listed_parent.remote(4), timeout=T) == 14
    (outer,) = state.list_tasks(filters=[("name", "=", "listed_parent")])
    assert outer.state == "FINISHED"

    def nested_done():
        rows = state.list_tasks(filters=[("name", "=", "listed_child")], limit=1000)
        return len(rows) == 4 and {r.state for r in rows} == {"FINISHED"} and \
            all(r.worker_pid and r.worker_pid != os.getpid() for r in rows)
    procs.eventually(nested_done, "the nested task's end", T)


def test_the_record_follows_an_actor_through_a_restart(session):
    from beamlet.util import state
    counter = Counter.options(name="restarted", namespace="state", max_restarts=1).remote(1)
    first = ray.get(counter.pid.remote(), timeout=T)
    (row,) = state.list_actors(filters=[("name", "=", "restarted")])
    assert (row.state, row.pid, row.num_restarts) == ("ALIVE", first, 0)
    second = _restarted(counter, first)

    def restarted_alive():
        now = state.get_actor(row.actor_id)
        return (now.state, now.pid, now.num_restarts) == ("ALIVE", second, 1)
    procs.eventually(restarted_alive, "the actor's restart", T)
    ray.kill(counter)
    (row,) = state.list_actors(filters=[("name", "=", "restarted")])
    assert row.state == "DEAD" and "kill" in row.death_cause


def test_the_drivers_plugins_hear_what_workers_run(session):
    """The driver's observer plugins hear the attempts of nested tasks, which
    run and end in Ray workers."""
    from beamlet.core import plugins
    from beamlet.core.plugins import hookimpl

    class Recorder:
        def __init__(self):
            self.submitted, self.finished = [], []

        @hookimpl
        def beamlet_task_submitted(self, spec):
            self.submitted.append(spec.display_name)

        @hookimpl
        def beamlet_task_finished(self, spec, status, duration):
            self.finished.append((spec.display_name, status))

    recorder = Recorder()
    plugins.register(recorder)
    try:
        assert ray.get(listed_parent.remote(2), timeout=T) == 1
        procs.eventually(lambda: sorted(recorder.finished) == [("listed_child", "FINISHED")] * 2 +
                         [("listed_parent", "FINISHED")], "the tasks' ends", T)
    finally:
        plugins.unregister(recorder)
    assert sorted(recorder.submitted) == ["listed_child", "listed_child", "listed_parent"]


def test_the_control_actor_keeps_task_events_bounded_until_their_driver_takes_them(session):
    """Workers' batches wait in the control actor for their driver: the newest
    8 MB per job, for 256 jobs at most (a driver killed before its end never
    takes again), none after the job's end."""
    import ray as real_ray

    from beamlet.backends.ray import control
    actor = control._TablesActor.remote()  # (one of its own, not the cluster's)
    try:
        def call(method, *args):
            return real_ray.get(getattr(actor, method).remote(*args), timeout=T)
        big = b"x" * (1 << 20)
        for i in range(10):
            call("add_events", "job-a", bytes([i]) + big[1:])  # (1 MB each)
        kept = call("take_events", "job-a", 0.1)
        assert [b[0] for b in kept] == [2, 3, 4, 5, 6, 7, 8, 9]
        assert call("take_events", "job-a", 0.01) == []
        waiting = actor.take_events.remote("job-a", T)  # (wakes on the next batch)
        call("add_events", "job-a", b"next")
        assert real_ray.get(waiting, timeout=T) == [b"next"]
        call("add_events", "job-a", b"unread")
        for j in range(control._EVENTS_JOBS):  # (job-a, taken least recently, goes)
            call("add_events", f"job-{j}", b"old")
        assert call("take_events", "job-0", 0.01) == [b"old"]
        assert call("take_events", "job-a", 0.01) == []
        waiting = actor.take_events.remote("job-a", T)
        call("end_events", "job-a")
        assert real_ray.get(waiting, timeout=T) is None
        call("add_events", "job-a", b"late")
        assert call("take_events", "job-a", 0.01) is None
    finally:
        real_ray.kill(actor)


def test_task_events_are_off_unless_asked_for(session, tmp_path):
    """(They cost some 10% more CPU per task.)"""
    code = ("import beamlet, pytest\n"
            "from beamlet.util import state\n"
            f"beamlet.init(backend='ray', address={session.address!r})\n"
            "f = beamlet.remote(lambda x: x + 1)\n"
            f"assert beamlet.get(f.remote(1), timeout={T}) == 2\n"
            "with pytest.raises(NotImplementedError, match='task_events=True'):\n"
            "    state.list_tasks()\n"
            "beamlet.shutdown()\n"
            "print('off')\n")
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=2 * T, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "off"


PLAIN_CALLS = """
import os, time
import beamlet, pytest
from beamlet import exceptions as exc
T = {T}
beamlet.init(backend="ray", address={address!r})

@beamlet.remote
def inc(x):
    return x + 1

@beamlet.remote
def context():
    return beamlet.get_runtime_context().get_task_id()

@beamlet.remote
def fail():
    raise KeyError("no")

@beamlet.remote
def nested(n):
    return sum(beamlet.get([inc.remote(beamlet.put(i)) for i in range(n)], timeout=T))

@beamlet.remote(num_returns="dynamic")
def items(n):
    for i in range(n):
        yield i

@beamlet.remote
def total(refs):
    return sum(beamlet.get(list(refs), timeout=T))

@beamlet.remote
def first(generator):
    return beamlet.get(next(iter(generator)), timeout=T)

r = beamlet.put(0)
for _ in range(20):               # refs as every argument: only they go to Ray
    r = inc.remote(r)
assert beamlet.get(r, timeout=T) == 20
ids = beamlet.get([context.remote() for _ in range(4)], timeout=T)  # no argument at all
assert len(set(ids)) == 4 and all(ids), ids
assert beamlet.get(inc.options(num_cpus=2).remote(r), timeout=T) == 21  # another kind
assert beamlet.get(inc.remote(r), timeout=T) == 21
with pytest.raises(ValueError, match="CPU"):
    inc.options(num_cpus=3).remote(r)
with pytest.raises(KeyError):
    beamlet.get(fail.remote(), timeout=T)
with pytest.raises(KeyError):     # a failed argument fails the task that takes it
    beamlet.get(inc.remote(fail.remote()), timeout=T)
assert beamlet.get(nested.remote(5), timeout=T) == 15   # inline arguments: the spec goes
gen = items.remote(3)
assert beamlet.get(total.remote(beamlet.get(gen, timeout=T)), timeout=T) == 3
assert beamlet.get(first.remote(gen), timeout=T) == 0   # a dynamic call's ref as the argument
@beamlet.remote
def sleep_through(path, seconds):
    open(path, "w").close()
    time.sleep(seconds)

started = os.path.abspath("started")
running = sleep_through.remote(beamlet.put(started), beamlet.put(300))  # (a plain call)
deadline = time.monotonic() + T
while not os.path.exists(started):
    assert time.monotonic() < deadline, "the task did not start"
    time.sleep(0.05)
beamlet.cancel(running)           # a task blocked in a system call is woken at once
with pytest.raises(exc.TaskCancelledError):
    beamlet.get(running, timeout=T / 2)
beamlet.shutdown()
print("plain")
"""


def test_plain_calls_without_task_events(session, tmp_path):
    """Without task events (the default) a plain task call gives Ray only its
    ref arguments (worker.plain_function): what each call needs, it finds."""
    code = PLAIN_CALLS.format(T=T, address=session.address)
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=4 * T, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "plain"


PLAIN_ACTOR_CALLS = """
import asyncio, os, sys, threading, time
import numpy as np
import beamlet, pytest, ray as real_ray
from beamlet import exceptions as exc
from beamlet.core import plugins
sys.path.insert(0, {tests!r})
import procs
T = {T}
beamlet.init(backend="ray", address={address!r})

@beamlet.remote
class Log:
    def __init__(self, start=0):
        self.items = [start]

    def add(self, x, y=0):
        self.items.append(x + y)
        return self.items[-1]

    def items_(self):
        return list(self.items)

    def call(self, x):          # (a name of the host's own: it goes the spec's way)
        return ("call", x)

    def _hidden(self):          # (a private name: the same)
        return "hidden"

    def size(self, a):
        return a.shape, float(a.sum())

    def ids(self):
        context = beamlet.get_runtime_context()
        return context.get_task_id(), context.get_actor_id()

    def fail(self):
        raise KeyError("no")

    def nested(self, n):
        return beamlet.get(double.remote(n), timeout=T)

    def pid(self):
        return os.getpid()

    def leave(self):
        beamlet.actor.exit_actor()

    def maybe_leave(self, go):
        if go:
            beamlet.actor.exit_actor()
        return "stayed"

    def lock(self, give):
        return threading.Lock() if give else None

    @beamlet.method(num_returns=2)
    def pair(self):
        return 1, 2

@beamlet.remote
def double(x):
    return 2 * x

@beamlet.remote
def fail():
    raise ValueError("upstream")

@beamlet.remote
def add_through(log, x):
    return beamlet.get(log.add.remote(x), timeout=T)

log = Log.remote(0)
host = real_ray.get_actor("beamlet-actor-" + log._actor_id.hex(), namespace="beamlet")
assert callable(host.add.remote) and not hasattr(host, "items")  # one Ray method a method
# Arguments inline, by ref, and as keywords (the spec's way), in order per caller.
assert beamlet.get(log.add.remote(1), timeout=T) == 1
assert beamlet.get(log.add.remote(beamlet.put(2)), timeout=T) == 2
assert beamlet.get(log.add.remote(3, y=1), timeout=T) == 4
refs = [log.add.remote(i) if i % 3 else log.add.remote(i, y=0) for i in range(30)]
assert beamlet.get(refs, timeout=T) == list(range(30))
assert beamlet.get(log.items_.remote(), timeout=T) == [0, 1, 2, 4] + list(range(30))
assert beamlet.get(log.call.remote(5), timeout=T) == ("call", 5)
assert beamlet.get(log._hidden.remote(), timeout=T) == "hidden"
assert beamlet.get(log.pair.remote()[1], timeout=T) == 2
small, big = np.arange(10.0), np.ones(500_000)
assert beamlet.get(log.size.remote(small), timeout=T) == ((10,), 45.0)
assert beamlet.get(log.size.remote(big), timeout=T) == ((500_000,), 500_000.0)
assert beamlet.get(log.size.remote(beamlet.put(big)), timeout=T) == ((500_000,), 500_000.0)
(t1, a1), (t2, a2) = beamlet.get([log.ids.remote(), log.ids.remote()], timeout=T)
assert t1 != t2 and a1 == a2 == log._actor_id.hex()
with pytest.raises(KeyError):
    beamlet.get(log.fail.remote(), timeout=T)
with pytest.raises(ValueError):   # a failed argument fails the call that takes it
    beamlet.get(log.add.remote(fail.remote()), timeout=T)
with pytest.raises(TypeError):    # checked at the call site, as every call
    log.add.remote()
assert beamlet.get(log.nested.remote(21), timeout=T) == 42
assert beamlet.get(add_through.remote(log, 7), timeout=T) == 7   # a handle in a task
named = Log.options(name="plain-log").remote(5)
assert beamlet.get(beamlet.get_actor("plain-log").add.remote(1), timeout=T) == 1
beamlet.kill(named)
with pytest.raises(exc.ActorDiedError):
    beamlet.get(named.add.remote(1), timeout=T)
# The process of an actor whose last handle is gone ends (no Ray method kept holds it).
pid = beamlet.get(log.pid.remote(), timeout=T)
del log, refs, host
assert procs.wait_gone([pid], T) == [], "the actor outlived its handles"
leaving = Log.remote()
with pytest.raises(exc.ActorDiedError):
    beamlet.get(leaving.leave.remote(), timeout=T)
with pytest.raises(exc.ActorDiedError, match="exit_actor"):
    beamlet.get(leaving.add.remote(1), timeout=T)
# A method's later calls take the short ways (the driver sends them without a
# spec; the actor runs one whose first call went the whole way without making
# one): they mean the same.
log = Log.remote(0)
method = log.add                 # (kept on the handle: it keeps no cycle, nor the actor)
assert log.add is method and beamlet.get([method.remote(i) for i in range(3)],
                                         timeout=T) == [0, 1, 2]
ids = beamlet.get([log.ids.remote() for _ in range(4)], timeout=T)
assert len({{t for t, _ in ids}}) == 4 and {{a for _, a in ids}} == {{log._actor_id.hex()}}
for _ in range(3):
    with pytest.raises(KeyError):
        beamlet.get(log.fail.remote(), timeout=T)
    with pytest.raises(TypeError, match="serializ"):  # (a result that cannot travel)
        beamlet.get(log.lock.remote(True), timeout=T)
    assert beamlet.get(log.lock.remote(False), timeout=T) is None
    with pytest.raises(ValueError):
        beamlet.get(log.add.remote(fail.remote()), timeout=T)
    assert beamlet.get(log.add.remote(beamlet.put(10), 3), timeout=T) == 13
submitted = []

def heard(spec):
    submitted.append(spec.method_name)

plugins.add_listener("beamlet_task_submitted", heard)
try:
    assert beamlet.get(log.add.remote(14), timeout=T) == 14   # (heard of: its spec's way)
finally:
    plugins.remove_listener("beamlet_task_submitted", heard)
assert submitted == ["add"]
pid = beamlet.get(log.pid.remote(), timeout=T)
del log
assert beamlet.get(method.remote(15), timeout=T) == 15   # (the method holds the actor)
del method
assert procs.wait_gone([pid], T) == [], "the actor outlived its handles"
leaving = Log.remote()
assert beamlet.get([leaving.maybe_leave.remote(False) for _ in range(2)],
                   timeout=T) == ["stayed"] * 2
with pytest.raises(exc.ActorDiedError, match="exit_actor"):
    beamlet.get(leaving.maybe_leave.remote(True), timeout=T)
with pytest.raises(exc.ActorDiedError, match="exit_actor"):
    beamlet.get(leaving.maybe_leave.remote(False), timeout=T)

@beamlet.remote(max_concurrency=1, concurrency_groups={{"io": 1}})
class Async:
    def __init__(self):
        self.event = None

    async def wait(self):
        self.event = self.event or asyncio.Event()
        await asyncio.wait_for(self.event.wait(), T)
        return "waited"

    @beamlet.method(concurrency_group="io")
    async def release(self):
        self.event = self.event or asyncio.Event()
        self.event.set()
        return "set"

    async def echo(self, x):
        await asyncio.sleep(0)
        return x

a = Async.remote()
waiting = a.wait.remote()          # (in the default group, as echo)
assert beamlet.get(a.release.remote(), timeout=T) == "set"
assert beamlet.get([waiting, a.echo.remote(3)], timeout=T) == ["waited", 3]
beamlet.shutdown()
print("plain actor calls")
"""


def test_plain_actor_calls_without_task_events(session, tmp_path):
    """Without task events (the default) a plain actor call is a call of its
    own Ray method (worker.actor_class), its arguments Ray's: what the call
    means (arguments, errors, order with the calls that go with their spec,
    runtime context, nested tasks, kill, exit_actor, the actor's end with its
    last handle, an async actor's default group) holds."""
    code = PLAIN_ACTOR_CALLS.format(T=T, address=session.address,
                                    tests=os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=6 * T, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "plain actor calls"


def test_cancelling_tasks_whose_results_are_in_leaves_the_driver_alive(session, tmp_path):
    """``get(ref)`` then ``cancel(ref)`` at once: a cancel of a finished task
    does nothing, and reaches no Ray. (Ray 2.60 stores a task's results, waking
    ``get``, just before its owner ends its record of the task; a
    ``ray.cancel`` in between killed the driver on a Ray-internal check, exit
    code 1 and no word from Python: within 50 rounds here under load.) In a
    driver of its own, so that such a death fails this test only."""
    code = ("import beamlet\n"
            f"beamlet.init(backend='ray', address={session.address!r})\n"
            "f = beamlet.remote(lambda x: x)\n"
            "for i in range(500):\n"
            "    ref = f.remote(i)\n"
            f"    assert beamlet.get(ref, timeout={T}) == i\n"
            "    beamlet.cancel(ref)\n"
            "    beamlet.cancel(ref, force=True, recursive=False)\n"
            f"    assert beamlet.get(ref, timeout={T}) == i\n"
            "beamlet.shutdown()\n"
            "print('alive')\n")
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=10 * T, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "alive"


PROBE = "beamlet-test-control-probe"


def _start_probe():
    """A stand-in for the control actor (async, as it is), whose writes last
    3 s and note whether they were cancelled."""
    import asyncio

    import ray as real_ray

    @real_ray.remote(num_cpus=0, max_concurrency=10)
    class Probe:
        def __init__(self):
            self.calls = []

        async def _slow(self):
            self.calls.append("started")
            try:
                await asyncio.sleep(3)
            except asyncio.CancelledError:
                self.calls.append("cancelled")
                raise
            self.calls.append("done")
            return True

        async def put(self, table, key, value, overwrite):
            return await self._slow()

        async def add_events(self, job_id, payload):
            await self._slow()

        async def seen(self):
            return list(self.calls)

    return Probe.options(name=PROBE, namespace="beamlet-tests").remote()


@ray.remote
def control_call_then_wait():
    """Calls a control store (whose actor is the probe) from the task's own
    thread, as beamlet does for its tables; the call lasts until cancelled."""
    import ray as real_ray

    from beamlet.backends.ray.control import RayControlStore
    probe = real_ray.get_actor(PROBE, namespace="beamlet-tests")
    store = RayControlStore(actor=probe, in_worker=True)
    try:
        return store.put("t", b"slow", b"v")
    finally:
        store.close()


@ray.remote
def flush_events_then_wait():
    """Sends a batch of task events to the probe from the task's own thread,
    as a call that runs ``exit_actor()`` does (`EventSender.flush`), and
    waits until it is kept."""
    import ray as real_ray

    from beamlet.backends.ray.events import EventSender
    sender = EventSender()
    sender._actor = real_ray.get_actor(PROBE, namespace="beamlet-tests")
    sender._buffer.append(("job", ("an event",)))  # (not waking the sender's own thread)
    sender.flush()


def _cancel_while_the_probe_runs(probe, task) -> None:
    """Start `task`, cancel it (recursive, the default) once its call is in
    flight in the probe, and check that the call still ran to its end."""
    import ray as real_ray
    ref = task.remote()
    procs.eventually(lambda: real_ray.get(probe.seen.remote(), timeout=T) == ["started"],
                     "the probe's call", T)
    ray.cancel(ref)  # (the call is in flight in the probe now)
    with pytest.raises(exc.TaskCancelledError):
        ray.get(ref, timeout=T)
    procs.eventually(lambda: len(real_ray.get(probe.seen.remote(), timeout=T)) > 1,
                     "the probe's call's end", T)
    assert real_ray.get(probe.seen.remote(), timeout=T) == ["started", "done"]


def test_cancelling_a_task_leaves_its_control_store_calls_alone(session):
    """cancel(task) (recursive, the default) cancels the actor calls the task
    submitted; the control store's calls are not the task's to cancel (and
    Ray 2.60, cancelling one on the control actor as it ended, crashed that
    actor: every table of the cluster lost)."""
    import ray as real_ray
    probe = _start_probe()
    try:
        _cancel_while_the_probe_runs(probe, control_call_then_wait)
    finally:
        real_ray.kill(probe)


def test_cancelling_a_task_leaves_the_task_events_it_flushed_alone(session):
    """The same for the task events a task's thread sends itself (an actor
    call that runs ``exit_actor()``, an actor's end): sent from the
    process's control thread, they are not the task's children either."""
    import ray as real_ray
    probe = _start_probe()
    try:
        _cancel_while_the_probe_runs(probe, flush_events_then_wait)
    finally:
        real_ray.kill(probe)


ENDING_DRIVER = """if True:
    import os, shutil, sys, tempfile
    import ray
    out = sys.argv[1]
    temp = tempfile.mkdtemp(prefix="beamlet-test-ray-")
    try:
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp)

        @ray.remote(num_cpus=0, max_concurrency=100)
        class Sink:
            async def add_events(self, job_id, payload):
                return True

        sink = Sink.options(name="sink", namespace="beamlet-tests",
                            lifetime="detached").remote()
        ray.get(sink.add_events.remote("", b""), timeout=60)

        @ray.remote(num_cpus=0)
        class Ending:
            def ready(self):
                return ray.get_actor("sink", namespace="beamlet-tests") is not None

            def __ray_shutdown__(self):
                from beamlet.backends.ray.events import EventSender
                sender = EventSender()
                sender._actor = ray.get_actor("sink", namespace="beamlet-tests")
                sender._buffer.append(("job", ("an event",)))
                refs = sender._send()
                with open(os.path.join(out, str(os.getpid())), "w") as f:
                    f.write(" ".join(ref.task_id().hex() for ref in refs))

        actors = [Ending.remote() for _ in range(4)]
        ray.get([a.ready.remote() for a in actors], timeout=60)
        del actors  # (each ends gracefully: no handle left)
        import time
        deadline = time.monotonic() + 30
        while len(os.listdir(out)) < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        ray.kill(sink)
        ray.shutdown()
    finally:
        shutil.rmtree(temp, ignore_errors=True)
"""


def test_task_events_sent_outside_any_task_are_distinct_calls(tmp_path):
    """An actor's graceful end (``__ray_shutdown__``) runs on its process's
    main thread outside any task, as ``atexit`` hooks do. There Ray 2.60
    gives the calls submitted task ids that depend only on how many such
    calls the process made: the same in new processes of one job (a Ray of
    its own, here), and two calls with one task id crash the async control
    actor ("Check failed: erased == 1"). The task events sent there must be
    distinct calls."""
    subprocess.run([sys.executable, "-c", ENDING_DRIVER, str(tmp_path)], check=True,
                   timeout=4 * T)
    sent = [path.read_text().split() for path in tmp_path.iterdir()]
    assert len(sent) == 4 and all(len(ids) == 1 for ids in sent)
    assert len({ids[0] for ids in sent}) == 4


def test_control_store_is_shared_with_workers(session):
    store = session.control_store
    assert store.put("t", "k", b"1", overwrite=False)
    assert not store.put("t", "k", b"2", overwrite=False)
    assert store.compare_and_set("t", "k", b"1", b"3")
    assert not store.compare_and_set("t", "k", b"1", b"4")
    received = []
    unsubscribe = store.subscribe("news", received.append)
    store.publish("news", b"first")
    store.publish("news", b"second")
    procs.eventually(lambda: received == [b"first", b"second"], "both messages", T)
    unsubscribe()
    assert store.delete("t", "k") and store.get("t", "k") is None


@ray.remote
def told_pid():
    return os.getpid()


def test_workers_tell_the_control_actor_made_after_one_that_died(session):
    """The control actor's process can die (Ray 2.60 crashes it now and then
    under load: see control.py), with what it kept. Then the workers send
    their task events to the control actor made after it, and the driver
    takes them there: the record still holds each task's process (which
    only its worker tells), and no read waits for reports that went to the
    dead actor. The control store's next call goes to the new actor too, and
    a subscriber hears what is published there (its channels count afresh)."""
    import ray as real_ray

    from beamlet.backends.ray.control import existing_control_actor
    from beamlet.util import state
    heard = []
    unsubscribe = session.control_store.subscribe("deaths", heard.append)
    session.control_store.publish("deaths", b"before")
    assert procs.wait_until(lambda: heard == [b"before"], T, interval=0.05), heard
    before = ray.get([told_pid.remote() for _ in range(4)], timeout=T)
    assert {r.worker_pid for r in state.list_tasks(filters=[("name", "=", "told_pid")])} \
        == set(before)  # (the workers have sent to the control actor)
    dead = existing_control_actor()
    real_ray.kill(dead)  # (as the crash ends its process)
    with pytest.raises(real_ray.exceptions.ActorDiedError):
        real_ray.get(dead.keys.remote("t"), timeout=T)
    after = ray.get([told_pid.remote() for _ in range(4)], timeout=T)
    assert set(after) & set(before)  # (the same workers: they sent to the dead actor)
    rows = state.list_tasks(filters=[("name", "=", "told_pid")])
    assert len(rows) == 8 and {r.state for r in rows} == {"FINISHED"}
    assert {r.worker_pid for r in rows} == set(before) | set(after)
    assert session.control_store.put("t", "after", b"1") and \
        session.control_store.get("t", "after") == b"1"
    session.control_store.publish("deaths", b"after")
    assert procs.wait_until(lambda: heard == [b"before", b"after"], T, interval=0.05), heard
    unsubscribe()


def test_another_driver_joins_by_address_and_leaves_ray_running(session, tmp_path):
    address = session.address
    code = ("import beamlet, pytest\n"
            "with pytest.raises(ValueError, match='num_gpus'):\n"
            f"    beamlet.init(backend='ray', address={address!r}, num_gpus=1)\n"
            f"beamlet.init(backend='ray', address={address!r})\n"
            "f = beamlet.remote(lambda x: x + 1)\n"
            f"print(beamlet.get(f.remote(41), timeout={T}))\n"
            "beamlet.shutdown()\n")
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=2 * T, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "42"
    assert ray.get(square.remote(5), timeout=T) == 25  # our Ray still serves


def test_a_plain_init_joins_the_ray_that_ray_address_names(session, tmp_path):
    """As ``ray.init()`` does: with ``$RAY_ADDRESS`` set, ``init(backend="ray")``
    joins that Ray (so it refuses resources of its own) and leaves it running."""
    code = ("import beamlet, pytest\n"
            "from beamlet.core import runtime\n"
            "with pytest.raises(ValueError, match='num_cpus'):\n"
            "    beamlet.init(backend='ray', num_cpus=1)\n"
            "beamlet.init(backend='ray')\n"
            "print(runtime.current().backend.address)\n"
            "f = beamlet.remote(lambda x: x + 1)\n"
            f"print(beamlet.get(f.remote(41), timeout={T}))\n"
            "beamlet.shutdown()\n")
    env = dict(os.environ, PYTHONPATH=REPO, RAY_ADDRESS=session.address)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=2 * T, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-2:] == [session.address, "42"]
    assert ray.get(square.remote(5), timeout=T) == 25  # our Ray still serves


def test_a_killed_drivers_ray_dir_is_swept_at_the_next_start(session, tmp_path):
    """A driver SIGKILLed with the Ray it started: Ray's processes die with it
    (Ray's fate sharing), and the next ``init()`` on the machine removes the
    session's temp dir and lock file."""
    import signal
    code = ("import sys, time, beamlet\n"
            "from beamlet.core import runtime\n"
            "beamlet.init(backend='ray', num_cpus=1)\n"
            "print(runtime.current().backend._temp_dir, flush=True)\n"
            "time.sleep(600)\n")
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env=env, cwd=str(tmp_path))
    held = None
    try:
        temp_dir = proc.stdout.readline().strip()
        assert temp_dir and os.path.isdir(temp_dir), f"the driver printed {temp_dir!r}"
        fds = [os.readlink(f"/proc/{proc.pid}/fd/{fd}")
               for fd in os.listdir(f"/proc/{proc.pid}/fd")]
        locks = [path for path in fds if path.endswith(".lock") and "beamlet-" in path]
        assert len(locks) == 1, fds
        with open(locks[0]) as f:
            assert f.read() == temp_dir
        # The session's lock, held here too until we have seen what the driver
        # left: the init() of any program beside this test (tests run in parallel)
        # would sweep it as soon as the driver is gone.
        held = procs.hold_file_of(proc.pid, locks[0])
        theirs = {pid for pid in ray_processes(temp_dir, _descendants())
                  if pid != proc.pid}  # (named by the dir; none of this module's Ray)
        assert theirs, "no process of that driver's Ray names its temp dir"
        proc.kill()
        proc.wait(GONE_TIMEOUT)
        left = procs.wait_gone(theirs, GONE_TIMEOUT)
        for pid in left:  # (started by this test's driver: ours to end)
            os.kill(pid, signal.SIGKILL)
        assert left == [], "Ray's processes outlived their driver"
        assert os.path.isdir(temp_dir) and os.path.exists(locks[0])  # nobody cleaned up
    finally:
        proc.kill()
        proc.wait(GONE_TIMEOUT)
        proc.stdout.close()
        if held is not None:
            os.close(held)
    # The next start on the machine, of any backend, in another program:
    start = subprocess.run([sys.executable, "-c", "import beamlet\n"
                            "beamlet.init(backend='local', num_cpus=1)\nbeamlet.shutdown()\n"],
                           capture_output=True, text=True, timeout=2 * T, env=env, cwd=str(tmp_path))
    assert start.returncode == 0, start.stderr[-3000:]
    # (or a start beside this test is sweeping it, holding its lock: then that one
    # removes it, within moments)
    assert procs.wait_until(lambda: not os.path.exists(temp_dir)
                            and not os.path.exists(locks[0]), GONE_TIMEOUT), (temp_dir, locks)


TASKS_ONLY = """
import beamlet, ray
T = {T}
beamlet.init(backend="ray", num_cpus=1)

@beamlet.remote
def inc(x):
    return x + 1

@beamlet.remote
def nested(n):
    return beamlet.get(inc.remote(n), timeout=T)

@beamlet.remote(num_returns=2)
def pair(x):
    return x, x + 1

@beamlet.remote(num_returns="streaming")
def items(n):
    yield from range(n)

@beamlet.remote
class Echo:
    def echo(self, x):
        return x

def control_actor():
    return [a for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"] == "beamlet-control"]

assert beamlet.get(inc.remote(beamlet.put(1)), timeout=T) == 2   # plain call
assert beamlet.get(nested.remote(2), timeout=T) == 3              # nested: a worker's call
assert beamlet.get(list(pair.remote(3)), timeout=T) == [3, 4]     # the job's Ray task
assert [beamlet.get(r, timeout=T) for r in items.remote(3)] == [0, 1, 2]
assert not control_actor(), control_actor()
echo = Echo.options(name="echo").remote()                       # a write: now it is made
assert beamlet.get(echo.echo.remote(5), timeout=T) == 5
assert control_actor()
assert beamlet.get(beamlet.get_actor("echo").echo.remote(6), timeout=T) == 6
beamlet.shutdown()
print("lazy")
"""


def test_a_program_of_tasks_only_never_makes_the_control_actor(tmp_path):
    """The control store's actor is a process of its own, made at the first
    write: a program that only runs tasks (nested ones, generators) never
    makes it, its functions' code travelling to Ray's workers with Ray's
    functions (control.py); an actor's name is then the first write. (On a Ray
    of its own: the module's session made the actor long ago.)"""
    code = TASKS_ONLY.format(T=T)
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=4 * T, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "lazy"


def test_shutdown_stops_the_ray_it_started(session):
    """(Last: it ends the module's session.)"""
    temp_dir = session._temp_dir
    assert temp_dir and os.path.isdir(temp_dir)
    actor = Counter.remote()
    worker_pids = {ray.get(actor.pid.remote(), timeout=T), ray.get(pid.remote(), timeout=T)}
    pids = ray_processes(temp_dir, session.test_processes_before)
    assert worker_pids <= pids
    ray.shutdown()
    assert procs.wait_gone(pids, GONE_TIMEOUT) == []
    assert not os.path.exists(temp_dir)
