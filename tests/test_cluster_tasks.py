"""Running tasks and actors on a cluster: the ``cluster`` backend (a driver)
against real daemons started with ``beamlet start`` (see test_cluster.py).

The driver runs in the test's process (``init(address=..., token=...)``) or,
for the seed programs and the environment's defaults, in a subprocess; the
daemons, their redis-server and their ZeroMQ sockets on 127.0.0.1 are real.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import procs
import pytest

import beamlet
from beamlet import exceptions as exc
from beamlet.core import runtime
from beamlet.core.auth import AuthenticationError
from beamlet.core.task_spec import TASK
from beamlet.util.queue import Queue
from beamlet.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from conftest import seed_program
from test_cluster import TIMEOUT, Cluster, _node_lines, cluster  # noqa: F401 - a fixture

GET_TIMEOUT = 60  # seconds any one get may take
#: Seconds a node is stopped in the test of a starved node: longer than the
#: silence after which a node was taken for dead before (2-3 s), well under
#: `transport.DEAD_AFTER` (10 s).
STARVED = 4.0


@pytest.fixture
def driver(no_backend):
    """``driver(head)`` connects this process to the cluster; it is shut down
    after the test, and must leave no thread of its own behind."""
    before = set(threading.enumerate())
    fds = set(os.listdir("/proc/self/fd"))

    def connect(head: dict, **options):
        return beamlet.init(address=head["address"], token=head["token"], **options)

    yield connect
    beamlet.shutdown()
    left = [t for t in set(threading.enumerate()) - before
            if t.is_alive() and t.name.startswith("beamlet")
            and t.name != "beamlet-callbacks"]
    assert not left, f"threads left running after shutdown: {left}"
    opened = {fd: os.path.realpath(f"/proc/self/fd/{fd}")
              for fd in set(os.listdir("/proc/self/fd")) - fds}
    opened = {fd: path for fd, path in opened.items() if os.path.exists(f"/proc/self/fd/{fd}")}
    assert not opened, f"descriptors left open after shutdown: {opened}"


@beamlet.remote
def where():
    """The node this task runs on."""
    return beamlet.get_runtime_context().get_node_id()


@beamlet.remote
class Where:
    def __init__(self):
        self.calls = 0

    def node(self):
        self.calls += 1
        return beamlet.get_runtime_context().get_node_id(), self.calls


@beamlet.remote(resources={"gpu_box": 1})
def where_pinned(node_id: str, resources: dict | None = None):
    """Where it runs, and where a task of its runs: pinned to `node_id`
    (soft=False), or, given `resources`, placed by them."""
    options = ({"resources": resources} if resources else
               {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False)})
    return (beamlet.get_runtime_context().get_node_id(),
            beamlet.get(where.options(**options).remote(), timeout=60))


def test_tasks_and_actors_go_where_their_resources_are(cluster, driver):
    head = cluster.start_head()
    first = cluster.join(head, "--resources", '{"gpu_box": 1}')
    info = driver(head)
    assert info["backend"] == "cluster"
    # A node that joins after the driver's init gets work too.
    second = cluster.join(head, "--resources", '{"ssd": 2}')
    assert procs.wait_until(lambda: {n["NodeID"] for n in beamlet.nodes()} ==
                            {head["node_id"], first, second}, 20, interval=0.1)
    assert beamlet.cluster_resources()["ssd"] == 2
    # NodeAffinitySchedulingStrategy: soft=False runs there or is refused; soft=True
    # falls back to any node that fits (the head has a CPU too).
    pinned = NodeAffinitySchedulingStrategy(second, soft=False)
    assert beamlet.get([where.options(scheduling_strategy=pinned).remote() for _ in range(2)],
                       timeout=GET_TIMEOUT) == [second] * 2
    assert beamlet.get(where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        "f" * 16, soft=True)).remote(), timeout=GET_TIMEOUT) in {head["node_id"], first, second}
    with pytest.raises(ValueError, match="not an alive node"):
        where.options(scheduling_strategy=NodeAffinitySchedulingStrategy("f" * 16, soft=False))
    # A task's own task pinned to another node (soft=False) runs there; one whose
    # request only another node's resources fit runs there too.
    assert beamlet.get(where_pinned.remote(second), timeout=GET_TIMEOUT) == (first, second)
    assert beamlet.get(where_pinned.remote(second, {"ssd": 1}),
                       timeout=GET_TIMEOUT) == (first, second)
    with pytest.raises(ValueError, match="cannot hold"):
        where.options(resources={"gpu_box": 1}, scheduling_strategy=pinned).remote()
    on_first = [where.options(resources={"gpu_box": 1}).remote() for _ in range(3)]
    on_second = [where.options(resources={"ssd": 1}).remote() for _ in range(3)]
    assert beamlet.get(on_first, timeout=GET_TIMEOUT) == [first] * 3
    assert beamlet.get(on_second, timeout=GET_TIMEOUT) == [second] * 3
    a = Where.options(resources={"gpu_box": 1}).remote()
    b = Where.options(resources={"ssd": 2}).remote()
    assert beamlet.get([a.node.remote() for _ in range(5)], timeout=GET_TIMEOUT) == \
        [(first, i) for i in range(1, 6)]
    assert beamlet.get(b.node.remote(), timeout=GET_TIMEOUT) == (second, 1)
    with pytest.raises(ValueError, match="'tpu'"):
        where.options(resources={"tpu": 1}).remote()
    with pytest.raises(ValueError, match="3.0 ssd"):
        where.options(resources={"ssd": 3}).remote()
    # A killed actor is dead for later calls; its node goes on.
    beamlet.kill(a)
    with pytest.raises(exc.ActorDiedError):
        beamlet.get(a.node.remote(), timeout=GET_TIMEOUT)
    assert beamlet.get(where.options(resources={"gpu_box": 1}).remote(),
                       timeout=GET_TIMEOUT) == first


@beamlet.remote(resources={"gpu_box": 1})
def make_array(megabytes: int):
    return np.arange(megabytes * (1 << 20) // 8, dtype=np.float64)


@beamlet.remote(resources={"ssd": 1})
def checksum(array):
    return beamlet.get_runtime_context().get_node_id(), float(array.sum()), array.nbytes


def test_a_wrong_token_is_refused_at_init(cluster, driver):
    head = cluster.start_head()
    with pytest.raises(AuthenticationError, match="token"):
        driver({"address": head["address"], "token": "ab" * 32})
    assert not beamlet.is_initialized()
    with pytest.raises(exc.BackendError, match="64 hex digits"):
        driver({"address": head["address"], "token": "xyz"})


def test_an_address_from_the_environment_or_auto(cluster, driver, monkeypatch):
    head = cluster.start_head()
    monkeypatch.setenv("BEAMLET_STATE_DIR", cluster.state_dir)
    monkeypatch.delenv("BEAMLET_TOKEN", raising=False)
    monkeypatch.delenv("BEAMLET_ADDRESS", raising=False)
    beamlet.init(address="auto")  # the head started here, its token from the state dir
    assert beamlet.get(where.remote(), timeout=GET_TIMEOUT) == head["node_id"]
    beamlet.shutdown()
    monkeypatch.setenv("BEAMLET_STATE_DIR", os.path.join(cluster.state_dir, "elsewhere"))
    monkeypatch.setenv("BEAMLET_ADDRESS", head["address"])
    monkeypatch.setenv("BEAMLET_TOKEN", head["token"])
    assert beamlet.init()["backend"] == "cluster"  # a plain init() joins $BEAMLET_ADDRESS
    assert beamlet.get(where.remote(), timeout=GET_TIMEOUT) == head["node_id"]


@beamlet.remote
def square(x):
    return x * x


@beamlet.remote
def sum_of_squares(n):
    # Nested: submitted from a worker, placed by the driver, gotten on this node.
    return sum(beamlet.get([square.remote(i) for i in range(n)], timeout=GET_TIMEOUT))


class _Relock:
    """Pickles here, and arrives on a node as a lock, which cannot be pickled again."""

    def __reduce__(self):
        return (threading.Lock, ())


@beamlet.remote
def ones_later(seconds: float):
    time.sleep(seconds)
    return np.ones(1 << 15)  # (256 KiB: it stays on its node)


def test_nested_tasks_and_ref_arguments(cluster, driver):
    head = cluster.start_head()
    cluster.join(head)
    driver(head)
    assert beamlet.get([sum_of_squares.remote(5) for _ in range(3)],
                       timeout=GET_TIMEOUT) == [30] * 3
    big = beamlet.put(np.ones(1 << 18))
    assert beamlet.get(checksum.options(resources={}).remote(big), timeout=GET_TIMEOUT)[1:] \
        == (float(1 << 18), 1 << 21)
    # A task its node cannot send on to a worker (its spec does not pickle there,
    # here when its argument is made on that node) fails, saying why; the node
    # goes on (its threads, and the worker and CPU that task was given).
    rt = runtime.current()
    rt.register_function(*square._code())
    spec, _keep = rt.make_spec(TASK, square._code()[0], "square", (ones_later.remote(0.5),),
                               {}, 1, {"CPU": 1.0})
    spec.retry_exceptions = _Relock()
    [unsendable] = rt.submit(spec)
    with pytest.raises(TypeError, match="cannot be sent to its worker"):
        beamlet.get(unsendable, timeout=GET_TIMEOUT)
    assert beamlet.get([square.remote(i) for i in range(4)], timeout=GET_TIMEOUT) == \
        [0, 1, 4, 9]


def test_tasks_of_a_killed_node_are_retried_or_fail(cluster, driver):
    head = cluster.start_head("--resources", '{"safe": 1, "any": 2}')
    doomed = cluster.join(head, "--resources", '{"doomed": 2, "any": 2}', "--num-cpus", "3")
    address = _node_lines(cluster.status())[doomed].split()[2]
    driver(head)

    @beamlet.remote(resources={"doomed": 1}, max_retries=0)
    def hang():
        import time
        time.sleep(600)

    @beamlet.remote(max_retries=3)
    def slow(i):
        import time
        time.sleep(0.2)
        return i

    stuck = hang.remote()
    d = Where.options(resources={"doomed": 1}).remote()
    beamlet.get(d.node.remote(), timeout=GET_TIMEOUT)
    # One on each node (placement weighs what is placed); the one on the doomed
    # node starts again on the other, fresh.
    movers = [Where.options(resources={"any": 1}, num_cpus=0, max_restarts=1).remote() for _ in range(2)]
    homes = dict(zip(beamlet.get([m.node.remote() for m in movers], timeout=GET_TIMEOUT),
                     movers))
    assert set(homes) == {(head["node_id"], 1), (doomed, 1)}
    many = [slow.remote(i) for i in range(20)]
    os.kill(cluster.pid_of(address), signal.SIGKILL)
    assert beamlet.get(many, timeout=GET_TIMEOUT) == list(range(20))
    with pytest.raises(exc.WorkerCrashedError, match="died"):
        beamlet.get(stuck, timeout=GET_TIMEOUT)
    with pytest.raises(exc.ActorDiedError):
        beamlet.get(d.node.remote(), timeout=GET_TIMEOUT)
    with pytest.raises(ValueError, match="'doomed'"):
        hang.remote()
    assert beamlet.get(homes[(head["node_id"], 1)].node.remote(), timeout=GET_TIMEOUT) == \
        (head["node_id"], 2)
    assert beamlet.get(homes[(doomed, 1)].node.remote(), timeout=GET_TIMEOUT) == \
        (head["node_id"], 1)


def test_a_driver_that_leaves_leaves_nothing_on_the_nodes(cluster, driver):
    head = cluster.start_head()
    member = cluster.join(head)
    driver(head)
    actors = [Where.remote() for _ in range(2)]
    beamlet.get([a.node.remote() for a in actors], timeout=GET_TIMEOUT)
    beamlet.get(make_array.options(resources={}).remote(8), timeout=GET_TIMEOUT)
    beamlet.shutdown()

    def idle():
        lines = _node_lines(cluster.status())
        return all(line.split()[-4:-2] == ["0", "0"] and " 0.0/" in line
                   and line.split()[-2].startswith("0.0/")  # (its object store)
                   for line in (lines[head["node_id"]], lines[member]))

    assert procs.wait_until(idle, 30, interval=0.5), cluster.status()


@beamlet.remote
class Holder:
    """Keeps the refs it is given (inside a list: they arrive as refs)."""

    def __init__(self):
        self.kept = []

    def keep(self, refs):
        self.kept.extend(refs)
        return float(sum(beamlet.get(r, timeout=GET_TIMEOUT).sum() for r in self.kept))


def test_an_actor_killed_lets_go_of_the_refs_its_worker_held(cluster, driver):
    head = cluster.start_head()
    member = cluster.join(head)
    driver(head)
    holder = Holder.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        member, soft=False)).remote()
    array = make_array.options(resources={}, scheduling_strategy=NodeAffinitySchedulingStrategy(
        member, soft=False)).remote(2)
    assert beamlet.get(holder.keep.remote([array]), timeout=GET_TIMEOUT) > 0
    del array  # (now only the actor's worker holds it)
    beamlet.kill(holder)

    def freed():
        line = _node_lines(cluster.status())[member]
        return line.split()[-2].startswith("0.0/")

    assert procs.wait_until(freed, 30, interval=0.5), cluster.status()


@pytest.fixture(scope="module")
def small_cluster(tmp_path_factory):
    """A head and one node (one CPU each), for the seed programs."""
    c = Cluster(str(tmp_path_factory.mktemp("cluster") / "state"))
    try:
        head = c.start_head()
        c.join(head)
        yield c
    finally:
        c.run("stop", check=False)
        left = [pid for pid, started in c.seen if procs.alive((pid, started))]
        assert not left, f"processes left running after beamlet stop: {left}"


@pytest.mark.xdist_group("small_cluster")  # (one cluster for all five, on one xdist worker)
@pytest.mark.parametrize("program", ["dynamic_graph", "nested", "parameter_server",
                                     "simulator", "tune_seed"])
def test_a_seed_program_runs_unchanged_on_a_cluster(program, small_cluster, tmp_path):
    env = {**small_cluster.env, "BEAMLET_BACKEND": "cluster", "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.run([sys.executable, seed_program(program)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{program}.py did not finish in {TIMEOUT}s\n{err.stdout}\n{err.stderr}")
    report = f"exit code {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, report
    assert any(line.startswith(f"{program} ok") for line in proc.stdout.splitlines()), report


SECOND_DRIVER = """
import sys
import beamlet
beamlet.init(address=sys.argv[1], token=sys.argv[2], namespace="shared")
counter = beamlet.get_actor("counter")
print("second driver saw", beamlet.get(counter.node.remote(), timeout=60))
beamlet.shutdown()
"""


def test_a_named_actor_made_by_one_driver_is_used_by_another(cluster, driver, tmp_path):
    head = cluster.start_head()
    member = cluster.join(head, "--resources", '{"ssd": 1}')
    driver(head, namespace="shared")
    counter = Where.options(name="counter", resources={"ssd": 1}).remote()
    assert beamlet.get(counter.node.remote(), timeout=GET_TIMEOUT) == (member, 1)
    script = tmp_path / "second.py"
    script.write_text(SECOND_DRIVER)
    proc = subprocess.run([sys.executable, str(script), head["address"], head["token"]],
                          env=cluster.env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    assert f"second driver saw ('{member}', 2)" in proc.stdout, proc.stdout + proc.stderr
    # The second driver's leaving does not end the actor: its creator holds it.
    assert beamlet.get(counter.node.remote(), timeout=GET_TIMEOUT) == (member, 3)


#: A module the creator's job imports (its workers, and so the detached
#: actor's nested tasks, find it on that job's sys.path).
DETACHED_WORK = """
import os

import numpy as np

import beamlet


@beamlet.remote
def square(x):
    return x * x


@beamlet.remote
def ones(n):
    return np.ones(n)


@beamlet.remote
class Helper:
    def job(self):
        return beamlet.get_runtime_context().get_job_id()

    def node(self):
        return beamlet.get_runtime_context().get_node_id()

    def pid(self):
        return os.getpid()


@beamlet.remote
class Keeper:
    def __init__(self):
        self.kept = []
        self.helper = None

    def job(self):
        return beamlet.get_runtime_context().get_job_id()

    def pid(self):
        return os.getpid()

    def fan_out(self, n, resources=None):
        task = square.options(resources=resources) if resources else square
        return beamlet.get([task.remote(i) for i in range(n)], timeout=60)

    def keep(self, n, resources=None):
        # a nested result the actor keeps, and returns by ref (large, or small)
        task = ones if n > 1000 else square
        ref = (task.options(resources=resources) if resources else task).remote(n)
        self.kept.append(ref)
        return [ref]

    def kept_values(self):
        return [beamlet.get(r, timeout=60) for r in self.kept]

    def keep_unseen(self, n, resources):
        # a small nested result nobody here gets before its owner leaves
        self.unseen = square.options(resources=resources).remote(n)

    def unseen_value(self):
        return beamlet.get(self.unseen, timeout=60)

    def call(self, handles, method):
        return beamlet.get(getattr(handles[0], method).remote(), timeout=60)

    def ones_here(self, n):
        return np.ones(n)

    def stream_sum(self, n):
        return sum(beamlet.get(r, timeout=60)
                   for r in count_to.options(num_returns="streaming").remote(n))

    def start_slow(self, go, resources):
        # a nested task still running when its creator driver leaves
        self.slow = until_file.options(resources=resources).remote(go)

    def slow_value(self):
        return beamlet.get(self.slow, timeout=60)

    def slow_value_after(self, go):
        # (the task it waits for is still running as it asks)
        open(go, "w").close()
        return beamlet.get(self.slow, timeout=60)

    def helper_pid(self, resources):
        # (an actor of its own, made once: Ray's owner of it is this actor)
        if self.helper is None:
            self.helper = Helper.options(resources=resources).remote()
        return beamlet.get(self.helper.pid.remote(), timeout=60)

    def helper_job(self):
        if self.helper is None:
            self.helper = Helper.remote()
        return beamlet.get(self.helper.job.remote(), timeout=60)

    def nodes(self, n, resources):
        # where nested tasks of its, and an actor of its, run
        task = node_of.options(resources=resources) if resources else node_of
        tasks = beamlet.get([task.remote() for _ in range(n)], timeout=60)
        helper = Helper.options(resources=resources).remote()  # (after: it holds one)
        return tasks, beamlet.get(helper.node.remote(), timeout=60)


    def wait_for(self, refs, started):
        # what each get of the creator's objects gives, the creator leaving
        open(started, "w").close()
        self.outcomes = []
        for ref in refs:
            try:
                value = beamlet.get(ref, timeout=30)
                self.outcomes.append(("value", int(np.sum(value))))
            except Exception as err:
                self.outcomes.append((type(err).__name__, 0))

    def outcomes_of_wait(self):
        return self.outcomes


@beamlet.remote
def node_of():
    return beamlet.get_runtime_context().get_node_id()


@beamlet.remote
def until_file(go):
    import time
    deadline = time.monotonic() + 60
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.02)
    return 42


@beamlet.remote
def count_to(n):
    for i in range(n):
        yield i



@beamlet.remote
def later(seconds, n):
    import time
    time.sleep(seconds)
    return np.ones(n)
"""

CREATOR = """
import os
import sys
import time

import beamlet
from detached_work import Keeper

beamlet.init(address=sys.argv[1], token=sys.argv[2], namespace="shared")
keeper = Keeper.options(name="keeper", lifetime="detached", resources={"ssd": 1}).remote()
mortal = Keeper.options(name="mortal", resources={"ssd": 1}).remote()
print("creator saw", beamlet.get(keeper.fan_out.remote(3), timeout=60),
      beamlet.get(mortal.job.remote(), timeout=60), flush=True)
open(sys.argv[3], "w").close()
deadline = time.monotonic() + 60
while not os.path.exists(sys.argv[4]) and time.monotonic() < deadline:
    time.sleep(0.05)
beamlet.shutdown()
"""


def test_a_detached_actor_outlives_its_creator_and_a_plain_one_dies_with_it(
        cluster, driver, tmp_path):
    """Ray's semantics across drivers: a named actor's calls run in its
    creator's job, whoever calls; the caller owns what its calls return; when
    the creator leaves, its non-detached actors die (ActorDiedError), while a
    detached one lives on and still submits nested tasks and actors, placed
    anywhere in the cluster and owned by an heir its node starts (as Ray's
    actor owns what it submits), calls actors on other nodes, keeps what it
    submitted while its creator was here, and is cleaned up when killed."""
    head = cluster.start_head("--resources", '{"head_box": 2}')
    member = cluster.join(head, "--resources", '{"ssd": 2}')
    (tmp_path / "detached_work.py").write_text(DETACHED_WORK)
    (tmp_path / "creator.py").write_text(CREATOR)
    created, go = tmp_path / "created", tmp_path / "go"
    creator = subprocess.Popen([sys.executable, str(tmp_path / "creator.py"), head["address"],
                                head["token"], str(created), str(go)], env=cluster.env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert procs.wait_until(lambda: created.exists() or creator.poll() is not None,
                                TIMEOUT, interval=0.05)
        assert created.exists(), "the creator did not make its actors"
        driver(head, namespace="shared")
        keeper, mortal = beamlet.get_actor("keeper"), beamlet.get_actor("mortal")
        creator_job = beamlet.get(keeper.job.remote(), timeout=GET_TIMEOUT)
        assert creator_job == beamlet.get(mortal.job.remote(), timeout=GET_TIMEOUT)
        assert creator_job != beamlet.get_runtime_context().get_job_id()
        # What this driver's calls return is its own; a nested result the
        # actor returns by ref (the creator's, while it is here: made on the
        # head, not the actor's node) reaches it too.
        mine = keeper.ones_here.remote(1 << 17)
        on_head = {"head_box": 1}
        kept_before = beamlet.get(keeper.keep.remote(1 << 17, on_head), timeout=GET_TIMEOUT)[0]
        assert beamlet.get(kept_before, timeout=GET_TIMEOUT).sum() == 1 << 17
        small_before = beamlet.get(keeper.keep.remote(3, on_head), timeout=GET_TIMEOUT)[0]
        assert beamlet.get(small_before, timeout=GET_TIMEOUT) == 9
        beamlet.get(keeper.keep_unseen.remote(5, on_head), timeout=GET_TIMEOUT)
        go.touch()
        out, err = creator.communicate(timeout=TIMEOUT)
    finally:
        if creator.poll() is None:
            creator.kill()
            creator.communicate()
    assert creator.returncode == 0, out + err
    assert "creator saw [0, 1, 4]" in out, out + err
    # The creator's plain actor died with its job; its name is free again.
    with pytest.raises(exc.ActorDiedError):
        beamlet.get(mortal.job.remote(), timeout=GET_TIMEOUT)
    with pytest.raises(ValueError):
        beamlet.get_actor("mortal")
    # What this driver got back before the creator left is still there.
    assert beamlet.get(mine, timeout=GET_TIMEOUT).sum() == 1 << 17
    assert beamlet.get(kept_before, timeout=GET_TIMEOUT).sum() == 1 << 17
    assert beamlet.get(small_before, timeout=GET_TIMEOUT) == 9
    # The detached actor lives on, in its creator's job, and its nested tasks
    # and actors run (placed by its node's heir, which owns them now).
    assert beamlet.get_actor("keeper")._actor_id == keeper._actor_id
    assert beamlet.get(keeper.job.remote(), timeout=GET_TIMEOUT) == creator_job
    assert beamlet.get(keeper.fan_out.remote(4), timeout=GET_TIMEOUT) == [0, 1, 4, 9]
    assert beamlet.get(keeper.helper_job.remote(), timeout=GET_TIMEOUT) == creator_job
    large = beamlet.get(keeper.keep.remote(1 << 16), timeout=GET_TIMEOUT)[0]
    small = beamlet.get(keeper.keep.remote(7), timeout=GET_TIMEOUT)[0]
    assert beamlet.get(large, timeout=GET_TIMEOUT).sum() == 1 << 16
    assert beamlet.get(small, timeout=GET_TIMEOUT) == 49
    kept = beamlet.get(keeper.kept_values.remote(), timeout=GET_TIMEOUT)
    assert [kept[0].sum(), kept[1], kept[2].sum(), kept[3]] == [1 << 17, 9, 1 << 16, 49]
    # What the actor submitted while its creator was here is its own (as in
    # Ray): a small result of it that never reached the actor's node before
    # the creator left is still there.
    assert beamlet.get(keeper.unseen_value.remote(), timeout=GET_TIMEOUT) == 25
    # A nested task the heir placed on the actor's own node, still running as
    # the actor waits for it: its result reaches the actor (through the heir,
    # which it goes to).
    go_slow = str(tmp_path / "go_slow")
    beamlet.get(keeper.start_slow.remote(go_slow, {"ssd": 1}), timeout=GET_TIMEOUT)
    assert beamlet.get(keeper.slow_value_after.remote(go_slow), timeout=GET_TIMEOUT) == 42
    # Its nested tasks and actors go where their resources are, on any node
    # (Ray's spillback and placement), not only its own; it calls an actor
    # on another node; a request no node could hold says why.
    assert beamlet.get(keeper.nodes.remote(3, on_head), timeout=GET_TIMEOUT) == (
        [head["node_id"]] * 3, head["node_id"])
    assert beamlet.get(keeper.nodes.remote(2, {"ssd": 1}), timeout=GET_TIMEOUT) == (
        [member] * 2, member)
    elsewhere = Where.options(resources={"head_box": 1}).remote()
    # (its call may reach the head before its creation, from this driver:
    # it waits for it there)
    assert beamlet.get(keeper.call.remote([elsewhere], "node"), timeout=GET_TIMEOUT) == (
        head["node_id"], 1)
    with pytest.raises(ValueError, match="ssd"):
        beamlet.get(keeper.fan_out.remote(1, {"ssd": 5}), timeout=GET_TIMEOUT)
    pid = beamlet.get(keeper.pid.remote(), timeout=GET_TIMEOUT)
    beamlet.kill(keeper)
    with pytest.raises(exc.ActorDiedError):
        beamlet.get(keeper.job.remote(), timeout=GET_TIMEOUT)
    with pytest.raises(ValueError):
        beamlet.get_actor("keeper")  # (its name is free again)
    # This driver's copies outlive the actor; the node keeps nothing else.
    assert beamlet.get(large, timeout=GET_TIMEOUT).sum() == 1 << 16
    del mine, kept_before, small_before, large, small, kept, elsewhere
    assert procs.wait_gone([pid], TIMEOUT) == []

    def idle():
        lines = _node_lines(cluster.status())
        return all(line.split()[-4:-2] == ["0", "0"] and line.split()[-2].startswith("0.0/")
                   for line in (lines[head["node_id"]], lines[member]))

    assert procs.wait_until(idle, 30, interval=0.5), cluster.status()


#: A creator whose detached actor waits for objects it owns (two still being
#: made on the head, one made there and pulled to the actor's node) as it leaves.
LEAVING_CREATOR = """
import os
import sys
import time

import beamlet
from detached_work import Keeper, later, ones

beamlet.init(address=sys.argv[1], token=sys.argv[2], namespace="shared")
keeper = Keeper.options(name="keeper", lifetime="detached", resources={"ssd": 1}).remote()
on_head = {"resources": {"head_box": 1}, "num_cpus": 0}
made = ones.options(**on_head).remote(1 << 18)
beamlet.wait([made], timeout=60)
refs = [later.options(**on_head).remote(5, 3), later.options(**on_head).remote(5, 1 << 18),
        made]
keeper.wait_for.remote(refs, sys.argv[3])
deadline = time.monotonic() + 60
while not os.path.exists(sys.argv[3]) and time.monotonic() < deadline:
    time.sleep(0.01)
beamlet.shutdown()
"""


def test_a_detached_actor_waiting_for_what_its_creator_was_sending_as_it_left_never_hangs(
        cluster, driver, tmp_path):
    """The creator leaves while its detached actor's gets of objects it owns
    are asked of it (two still being made, one being pulled from another
    node): each get gives the value or ObjectLostError (OwnerDiedError), in
    bounded time, never a hang."""
    head = cluster.start_head("--resources", '{"head_box": 2}')
    member = cluster.join(head, "--resources", '{"ssd": 2}')
    (tmp_path / "detached_work.py").write_text(DETACHED_WORK)
    (tmp_path / "creator.py").write_text(LEAVING_CREATOR)
    started = tmp_path / "started"
    creator = subprocess.run([sys.executable, str(tmp_path / "creator.py"), head["address"],
                              head["token"], str(started)], env=cluster.env,
                             capture_output=True, text=True, timeout=TIMEOUT)
    assert creator.returncode == 0, creator.stdout + creator.stderr
    assert started.exists()
    driver(head, namespace="shared")
    keeper = beamlet.get_actor("keeper")
    outcomes = beamlet.get(keeper.outcomes_of_wait.remote(), timeout=GET_TIMEOUT)
    assert len(outcomes) == 3, outcomes
    for (kind, total), size in zip(outcomes, [3, 1 << 18, 1 << 18]):
        assert kind in ("value", "ObjectLostError", "OwnerDiedError"), outcomes
        assert kind != "value" or total == size, outcomes
    assert beamlet.get(keeper.job.remote(), timeout=GET_TIMEOUT)  # (it lives on)
    pid = beamlet.get(keeper.pid.remote(), timeout=GET_TIMEOUT)
    beamlet.kill(keeper)
    assert procs.wait_gone([pid], TIMEOUT) == []
    assert member


#: A creator that makes a detached actor and leaves.
BRIEF_CREATOR = """
import sys

import beamlet
from detached_work import Keeper

beamlet.init(address=sys.argv[1], token=sys.argv[2], namespace="shared")
keeper = Keeper.options(name="keeper", lifetime="detached", resources={"ssd": 1}).remote()
beamlet.get(keeper.job.remote(), timeout=60)
beamlet.shutdown()
"""

HEIR_JOINED = "detached actors here submit from now on"


def _logs(cluster) -> str:
    """What every daemon of `cluster` logged so far."""
    directory = os.path.join(cluster.state_dir, "logs")
    out = []
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), errors="replace") as f:
            out.append(f.read())
    return "\n".join(out)


def _run_creator(cluster, head: dict, tmp_path, script: str, *args: str) -> str:
    """Run `script` (a driver importing DETACHED_WORK, given the head's
    address and token, then `args`) to its end; what it printed."""
    (tmp_path / "detached_work.py").write_text(DETACHED_WORK)
    (tmp_path / "creator.py").write_text(script)
    proc = subprocess.run([sys.executable, str(tmp_path / "creator.py"), head["address"],
                           head["token"], *args], env=cluster.env, capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_an_heir_starts_only_once_a_detached_actor_submits_work(cluster, driver, tmp_path):
    """A detached actor whose creator left gets an heir (a driver with
    connections to every node) only when it first submits work: one that
    only answers calls has none; its first nested task starts it, and runs."""
    head = cluster.start_head()
    cluster.join(head, "--resources", '{"ssd": 1}')
    _run_creator(cluster, head, tmp_path, BRIEF_CREATOR)
    driver(head, namespace="shared")
    keeper = beamlet.get_actor("keeper")
    assert beamlet.get(keeper.job.remote(), timeout=GET_TIMEOUT)
    # (An heir started when the creator left would have joined by now.)
    assert not procs.wait_until(lambda: HEIR_JOINED in _logs(cluster), 10, interval=0.5)
    assert beamlet.get(keeper.fan_out.remote(3), timeout=GET_TIMEOUT) == [0, 1, 4]
    assert HEIR_JOINED in _logs(cluster)
    pid = beamlet.get(keeper.pid.remote(), timeout=GET_TIMEOUT)
    beamlet.kill(keeper)
    assert procs.wait_gone([pid], TIMEOUT) == []


#: A creator whose detached actor makes an actor of its own (on the head),
#: then leaves.
OWNER_CREATOR = """
import sys

import beamlet
from detached_work import Keeper

beamlet.init(address=sys.argv[1], token=sys.argv[2], namespace="shared")
keeper = Keeper.options(name="keeper", lifetime="detached", resources={"ssd": 1}).remote()
print("helper pid", beamlet.get(keeper.helper_pid.remote({"head_box": 1}), timeout=60),
      flush=True)
beamlet.shutdown()
"""


def test_an_actor_a_detached_actor_made_lives_and_dies_with_it(cluster, driver, tmp_path):
    """Ray's ownership: an actor that a detached actor created (on another
    node, while the creator driver was here) is owned by that actor, not by
    the driver: it outlives the driver, and dies when its owner is killed."""
    head = cluster.start_head("--resources", '{"head_box": 1}')
    cluster.join(head, "--resources", '{"ssd": 1}')
    out = _run_creator(cluster, head, tmp_path, OWNER_CREATOR)
    helper_pid = int(out.split("helper pid")[1].split()[0])
    driver(head, namespace="shared")
    keeper = beamlet.get_actor("keeper")
    # The same actor answers after its creator driver left.
    assert beamlet.get(keeper.helper_pid.remote({"head_box": 1}),
                       timeout=GET_TIMEOUT) == helper_pid
    pid = beamlet.get(keeper.pid.remote(), timeout=GET_TIMEOUT)
    beamlet.kill(keeper)
    assert procs.wait_gone([pid, helper_pid], TIMEOUT) == []


@pytest.fixture
def node_here():
    """``node_here(head, *options)`` runs a member node daemon in this process
    (its loop in a thread; its workers are processes, its sockets real), so
    that a test can look at what the node keeps; closed after the test."""
    from beamlet.backends.zmq.daemon import MemberDaemon, parse_args
    started = []

    def start(head: dict, *options: str):
        args = parse_args(["--address", head["address"], "--num-cpus", "1", *options])
        daemon = MemberDaemon(args, bytes.fromhex(head["token"]))
        thread = threading.Thread(target=daemon.serve, name="node-here", daemon=True)
        started.append((daemon, thread))
        daemon.start()
        thread.start()
        return daemon

    yield start
    for daemon, thread in started:
        daemon.stop()
        if thread.is_alive():
            thread.join(TIMEOUT)
        daemon.close()


#: A second driver that calls the detached actor: ``caller.py ADDRESS TOKEN
#: METHOD ARG``, printing what the call returns.
CALLER = """
import sys

import beamlet

beamlet.init(address=sys.argv[1], token=sys.argv[2], namespace="shared")
keeper = beamlet.get_actor("keeper")
print("got", beamlet.get(getattr(keeper, sys.argv[3]).remote(int(sys.argv[4])), timeout=60),
      flush=True)
beamlet.shutdown()
"""


def test_an_heir_forgets_streams_that_ended_and_is_ended_when_its_connection_drops(
        cluster, node_here, tmp_path):
    """A detached actor whose creator left consumes a stream through its
    node's heir: once the stream is over the heir keeps nothing of it. When
    the heir's connection to its node drops, the heir is ended (with its
    connections to every node), and the node runs what the actor submits."""
    head = cluster.start_head()
    member = node_here(head, "--resources", '{"ssd": 1}')
    _run_creator(cluster, head, tmp_path, BRIEF_CREATOR)

    def call(*args: str) -> str:
        return _run_creator(cluster, head, tmp_path, CALLER, *args)

    assert "got 6" in call("stream_sum", "4")
    owner = member.owner
    assert len(owner._heir_runtimes) == 1, owner._heir_runtimes
    (kept, runtime), = owner._heir_runtimes.items()
    scheduler = runtime.backend.scheduler
    assert procs.wait_until(lambda: not scheduler.owned_prefixes, 30, interval=0.1), \
        scheduler.owned_prefixes
    assert scheduler.stream_prefixes == {}
    heir = kept.heir
    # (as the daemon drops a connection that breaks the protocol: on its loop)
    owner._loop_calls.append(lambda: (heir.conn.close(), member.driver_left(heir.conn)))
    assert procs.wait_until(lambda: runtime.backend._closed, TIMEOUT, interval=0.1)
    assert not owner._heir_runtimes
    assert "got [0, 1, 4]" in call("fan_out", "3")


def test_a_node_does_without_an_heir_that_does_not_join_in_time(
        cluster, node_here, tmp_path, monkeypatch, capsys):
    """An heir that cannot join (here: its cluster address accepts the
    connection and never answers) is given up on after HEIR_START_WAIT: what
    the detached actor submitted meanwhile runs on its node, long before the
    heir's own connection attempt would give up."""
    import socket

    from beamlet.backends.zmq import jobs
    monkeypatch.setattr(jobs, "HEIR_START_WAIT", 1.0)
    head = cluster.start_head()
    member = node_here(head, "--resources", '{"ssd": 1}')
    _run_creator(cluster, head, tmp_path, BRIEF_CREATOR)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        member.owner.heir_address = f"127.0.0.1:{silent.getsockname()[1]}"
        out = _run_creator(cluster, head, tmp_path, CALLER.replace("timeout=60", "timeout=9"),
                           "fan_out", "3")
    assert "got [0, 1, 4]" in out
    assert "did not join within 1 s" in capsys.readouterr().err


def test_an_heir_whose_hello_its_node_reads_after_its_runtime_is_made_joins(
        cluster, node_here, tmp_path, monkeypatch, capsys):
    """An heir's Runtime is made once its DriverHello is sent, not once its
    node read it: a slow turn of the node's loop (a loaded machine) reads it
    after the heir's start handed the loop its Runtime. The node waits for
    the hello and keeps the heir, which owns what the detached actor submits
    (here nested tasks only another node can run), as with a quick loop."""
    from beamlet.backends.zmq.daemon import TICK, MemberDaemon
    from beamlet.core.interfaces import Joined
    real_on_event = MemberDaemon.on_event
    slow = {}

    def on_event(self, event):
        real_on_event(self, event)
        owner = self.owner
        if type(event) is Joined and owner._heirs and not slow:
            # The slow turn: the one in which the heir's connection joined
            # (its hello follows, unread until the next poll). It lasts until
            # the heir's Runtime is made and has handed the loop its start
            # (`_heir_ready`), and a tick is due: the turn's end runs that
            # before the loop reads the hello.
            slow["made"] = procs.wait_until(
                lambda: owner._heir_runtimes and owner._loop_calls, TIMEOUT, interval=0.01)
            time.sleep(TICK)
    monkeypatch.setattr(MemberDaemon, "on_event", on_event)
    head = cluster.start_head("--resources", '{"head_box": 3}')
    member = node_here(head, "--resources", '{"ssd": 1}')
    _run_creator(cluster, head, tmp_path, BRIEF_CREATOR)
    out = _run_creator(cluster, head, tmp_path, CALLER.replace(
        "int(sys.argv[4])", 'int(sys.argv[4]), {"head_box": 1}'), "fan_out", "3")
    assert slow == {"made": True}
    assert "got [0, 1, 4]" in out
    err = capsys.readouterr().err
    assert HEIR_JOINED in err and "no heir" not in err, err
    (kept, runtime), = member.owner._heir_runtimes.items()
    assert kept.heir is not None and not kept.heir_failed
    assert not member.owner._heirs and not member.owner._heirs_made


def test_a_call_handed_to_a_nodes_loop_that_fails_is_logged_and_the_loop_goes_on(
        cluster, node_here, capsys):
    """What other threads hand to a node's loop (an heir's start, owners that
    died, ...) runs on it: one that raises is logged with its traceback, and
    the calls after it, and the loop, go on."""
    head = cluster.start_head()
    member = node_here(head)
    after = threading.Event()

    def broken():
        raise RuntimeError("a broken loop call")
    member.owner._loop_calls.extend([broken, after.set])
    assert after.wait(TIMEOUT)
    err = capsys.readouterr().err
    assert "RuntimeError('a broken loop call')" in err and "in broken" in err, err
    later = threading.Event()  # (and the loop's later turns run)
    member.owner._loop_calls.append(later.set)
    assert later.wait(TIMEOUT)


def test_a_failed_heir_start_is_handled_on_the_nodes_loop(cluster, node_here, tmp_path,
                                                          monkeypatch):
    """An heir that fails to start (here: refused by the head, for a wrong
    key) is given up on by the node's loop, not by the heir's starting
    thread, which would race the loop over the job's state; what the
    detached actor submitted runs on its node."""
    head = cluster.start_head()
    member = node_here(head, "--resources", '{"ssd": 1}')
    _run_creator(cluster, head, tmp_path, BRIEF_CREATOR)
    owner = member.owner
    handled_in = []
    real = owner._heir_failed

    def heir_failed(*args):
        handled_in.append(threading.current_thread().name)
        return real(*args)

    monkeypatch.setattr(owner, "_heir_failed", heir_failed)
    owner.secret = os.urandom(32)  # (the heir's key: the head refuses it at once)
    out = _run_creator(cluster, head, tmp_path, CALLER, "fan_out", "3")
    assert "got [0, 1, 4]" in out
    assert handled_in == ["node-here"], handled_in  # (the loop's thread)


def test_an_heir_that_finishes_starting_as_its_node_closes_is_ended(
        cluster, node_here, tmp_path, monkeypatch):
    """The node closes while an heir is still starting (its Runtime made, not
    yet handed to the node): once started, the heir is ended, not kept with
    its connections to every node for nobody."""
    from beamlet.backends.zmq import heir
    head = cluster.start_head()
    member = node_here(head, "--resources", '{"ssd": 1}')
    _run_creator(cluster, head, tmp_path, BRIEF_CREATOR)
    made, go = [], threading.Event()
    real = heir.start_heir

    def start_heir(address, secret, config, started, failed):
        def made_then_started(runtime):
            made.append(runtime)
            go.wait(TIMEOUT)  # (until the node has closed)
            started(runtime)

        return real(address, secret, config, made_then_started, failed)

    monkeypatch.setattr(heir, "start_heir", start_heir)
    (tmp_path / "caller.py").write_text(CALLER)
    caller = subprocess.Popen([sys.executable, str(tmp_path / "caller.py"), head["address"],
                               head["token"], "fan_out", "3"], env=cluster.env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert procs.wait_until(lambda: made, TIMEOUT, interval=0.1), "no heir started"
        member.stop()
        for thread in [t for t in threading.enumerate() if t.name == "node-here"]:
            thread.join(TIMEOUT)
        member.close()
        go.set()
        assert procs.wait_until(lambda: made[0].backend._closed, TIMEOUT, interval=0.1), \
            "the heir that started after its node closed is still running"
    finally:
        go.set()
        if caller.poll() is None:
            caller.kill()
        caller.communicate()


@pytest.fixture
def owner_here():
    """A node daemon's job owner (``jobs.DriverOwner``) with its Node, in this
    process, with no loop and no listener: a test calls its methods in the
    order it wants (the loop's thread is the test's); closed after."""
    from beamlet.backends.local.node import Node
    from beamlet.backends.zmq import protocol as P
    from beamlet.backends.zmq.jobs import DriverOwner
    from beamlet.backends.zmq.transport import ZmqTransport
    from beamlet.core.control_store import open_control_store
    from beamlet.core.resources import ResourcePool
    owner = DriverOwner()
    node = Node(owner, open_control_store(None), ResourcePool(1, 0, None), 64 << 20,
                100 * 1024, prestart_workers=0)
    transport = ZmqTransport(os.urandom(32), P.VERSION, codec=P.CODEC)
    owner.attach(node, transport)
    yield owner
    owner.close()
    node.close()
    transport.close()


def test_an_eager_copy_whose_last_ref_goes_as_it_is_stored_is_freed(owner_here, monkeypatch):
    """A copy of a detached actor's nested result comes to its node for the
    refs its workers hold (see DriverOwner.accept): if the last one goes
    between the node's look at their count and the copy's put, the copy is
    freed after the put, not kept for nobody."""
    from beamlet.backends.zmq import protocol as P
    from beamlet.core import ids
    from beamlet.core.serialization import serialize
    owner = owner_here
    store = owner.node.object_store
    object_id = ids.new_id()
    owner._eager.add(object_id)
    owner.refs.incr(object_id)  # (a worker here holds a ref to it)
    real_put = store.put

    def put(oid, sobj, *args, **kwargs):
        if oid == object_id:
            owner.refs.decr(object_id)  # (its last ref goes just now)
        return real_put(oid, sobj, *args, **kwargs)

    monkeypatch.setattr(store, "put", put)
    owner._store([(object_id, P.wire(serialize(7)))])
    assert object_id not in owner._eager
    # (Node.release queues it for the node's I/O thread)
    assert procs.wait_until(lambda: not store.contains(object_id), TIMEOUT, interval=0.05), \
        "the copy is kept with no ref to it"


def test_each_early_actor_call_waits_its_own_while(owner_here, monkeypatch):
    """Calls of an actor whose creation has not reached the node wait for it,
    each for EARLY_CALL_WAIT from its own arrival: the first one's expiry
    does not fail the ones that came later."""
    from beamlet.backends.zmq import jobs
    from beamlet.core import ids
    from beamlet.core.task_spec import ACTOR_METHOD, TaskSpec
    owner = owner_here
    link = jobs.DriverLink(owner, None, {})  # (a driver not connected: nothing runs)
    actor_id = ids.new_id()

    def call():
        return TaskSpec(ids.new_id(), ACTOR_METHOD, ids.new_id(), "A.f", [], {},
                        (ids.new_id(),), {}, actor_id=actor_id, method_name="f")

    first, second = call(), call()
    monkeypatch.setattr(jobs, "EARLY_CALL_WAIT", 0.0)
    owner._run(link, first, [], [])
    monkeypatch.setattr(jobs, "EARLY_CALL_WAIT", 3600.0)
    owner._run(link, second, [], [])
    assert [c[2] for c in owner._early_calls[actor_id]] == [first, second]
    owner._expire_early_calls()
    assert [c[2] for c in owner._early_calls.get(actor_id, [])] == [second]


#: A creator that leaves while its detached actor's nested task (its
#: resources the JSON of argv[4]) still runs.
SLOW_CREATOR = """
import json
import sys

import beamlet
from detached_work import Keeper

beamlet.init(address=sys.argv[1], token=sys.argv[2], namespace="shared")
keeper = Keeper.options(name="keeper", lifetime="detached", resources={"ssd": 1}).remote()
beamlet.get(keeper.start_slow.remote(sys.argv[3], json.loads(sys.argv[4])), timeout=60)
beamlet.shutdown()
"""


@pytest.mark.parametrize("on", ["the actor's node", "another node"])
def test_a_detached_actors_nested_task_running_as_its_creator_leaves_keeps_its_result(
        cluster, driver, tmp_path, on):
    """Ray's ownership: what a detached actor submits is the actor's. Its
    nested task (on the actor's node, or on another: that node hands the
    result to the actor's, which claims it) still runs when the creator
    driver leaves; its result still reaches the actor, not OwnerDiedError."""
    head = cluster.start_head("--resources", '{"head_box": 1}')
    cluster.join(head, "--resources", '{"ssd": 2}')
    go = tmp_path / "go"
    resources = '{"ssd": 1}' if on == "the actor's node" else '{"head_box": 1}'
    _run_creator(cluster, head, tmp_path, SLOW_CREATOR, str(go), resources)
    driver(head, namespace="shared")
    keeper = beamlet.get_actor("keeper")
    value = keeper.slow_value.remote()
    go.touch()
    assert beamlet.get(value, timeout=GET_TIMEOUT) == 42
    pid = beamlet.get(keeper.pid.remote(), timeout=GET_TIMEOUT)
    beamlet.kill(keeper)
    assert procs.wait_gone([pid], TIMEOUT) == []


@beamlet.remote
def put_inside(value):
    return [beamlet.put(value)]  # an object put on its node, returned by ref


@beamlet.remote
def first_of(refs):
    return beamlet.get(refs[0], timeout=GET_TIMEOUT)


def test_a_ref_put_on_a_node_reaches_the_driver_and_other_tasks(cluster, driver):
    head = cluster.start_head()
    cluster.join(head)
    driver(head)
    inner = beamlet.get(put_inside.remote("deep"), timeout=GET_TIMEOUT)[0]
    assert beamlet.get(inner, timeout=GET_TIMEOUT) == "deep"
    assert beamlet.get(first_of.remote([inner]), timeout=GET_TIMEOUT) == "deep"
    assert beamlet.get(first_of.remote(put_inside.remote(np.ones(1 << 16))),
                       timeout=GET_TIMEOUT).sum() == 1 << 16


#: The work each of two drivers runs at once (a module both import, so that
#: both jobs' workers can): a task that submits tasks and gets them, a task
#: that puts an object and returns its ref inside a list, an actor that keeps
#: refs it put and submits tasks. Each result names the job it ran in.
SIDE_WORK = """
import os
import time
import beamlet


def job():
    return beamlet.get_runtime_context().get_job_id()


@beamlet.remote
def leaf(x):
    return x * 2, job()


@beamlet.remote
def worker_pid():
    return os.getpid()


@beamlet.remote
def fan(n):
    return job(), beamlet.get([leaf.remote(i) for i in range(n)], timeout=60)


@beamlet.remote
def put_inside(value):
    return [beamlet.put(value)]


@beamlet.remote
def first_of(refs):
    return beamlet.get(refs[0], timeout=60)


@beamlet.remote(num_cpus=0)  # (it waits holding no CPU: the other driver's work goes on)
def after_file(path):
    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    return beamlet.get(fan.remote(3), timeout=60)


@beamlet.remote
class Keeper:
    def __init__(self, tag):
        self.tag = tag
        self.kept = []

    def keep(self, value):
        self.kept.append(beamlet.put(value))
        return self.tag, job(), beamlet.get(leaf.remote(len(self.kept)), timeout=60)

    def kept_values(self):
        return beamlet.get(self.kept, timeout=60)

    def pid(self):
        return os.getpid()


def one_round(tag, keeper, i):
    me = job()
    value = f"{tag}-{i}"
    fanned = beamlet.get(fan.remote(4), timeout=60)
    assert fanned == (me, [(2 * k, me) for k in range(4)]), (tag, me, fanned)
    inner = beamlet.get(put_inside.remote(value), timeout=60)[0]
    assert beamlet.get(inner, timeout=60) == value
    assert beamlet.get(first_of.remote([inner]), timeout=60) == value
    assert beamlet.get(first_of.remote(put_inside.remote(value)), timeout=60) == value
    kept = beamlet.get(keeper.keep.remote(value), timeout=60)
    assert kept == (tag, me, (2 * (i + 1), me)), (tag, me, kept)
"""

SIDE_DRIVER = """
import os
import sys
import beamlet
import side_work

address, token, started, stop = sys.argv[1:5]
beamlet.init(address=address, token=token)
keeper = side_work.Keeper.remote("second")
rounds = 0
while not os.path.exists(stop) or rounds < 2:
    side_work.one_round("second", keeper, rounds)
    rounds += 1
    if rounds == 1:
        open(started, "w").close()
assert beamlet.get(keeper.kept_values.remote(), timeout=60) == [
    f"second-{i}" for i in range(rounds)]
pids = {beamlet.get(keeper.pid.remote(), timeout=60)} | set(
    beamlet.get([side_work.worker_pid.remote() for _ in range(4)], timeout=60))
print("second driver ran", rounds, "rounds in job", side_work.job(), flush=True)
print("PIDS", *sorted(pids), flush=True)
beamlet.shutdown()
"""


def test_two_drivers_at_once_each_get_their_own_nested_results(cluster, driver, tmp_path,
                                                               monkeypatch):
    head = cluster.start_head()
    cluster.join(head)
    (tmp_path / "side_work.py").write_text(SIDE_WORK)
    (tmp_path / "second.py").write_text(SIDE_DRIVER)
    monkeypatch.syspath_prepend(str(tmp_path))  # (so this job's workers import it too)
    import side_work
    driver(head)
    keeper = side_work.Keeper.remote("first")
    side_work.one_round("first", keeper, 0)  # this job's workers run before the second joins
    started, stop = tmp_path / "started", tmp_path / "stop"
    proc = subprocess.Popen([sys.executable, str(tmp_path / "second.py"), head["address"],
                             head["token"], str(started), str(stop)], env=cluster.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.exists(), "the second driver did not finish its first round"
        for i in range(1, 4):  # while the second driver runs its rounds
            side_work.one_round("first", keeper, i)
        go = tmp_path / "go"
        waiting = side_work.after_file.remote(str(go))  # runs while the second one leaves
        stop.touch()
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out + err
    assert "second driver ran" in out, out + err
    assert side_work.job() not in out  # (its own job, not this one)
    go.touch()
    me = side_work.job()
    assert beamlet.get(waiting, timeout=GET_TIMEOUT) == (me, [(2 * k, me) for k in range(3)])
    side_work.one_round("first", keeper, 4)
    assert beamlet.get(keeper.kept_values.remote(), timeout=GET_TIMEOUT) == [
        f"first-{i}" for i in range(5)]
    # The second driver's workers (its actor's, idle ones) are let go.
    pids = [int(p) for p in out.split("PIDS", 1)[1].split()]
    ours = {beamlet.get(keeper.pid.remote(), timeout=GET_TIMEOUT)}
    assert pids and not ours & set(pids)
    deadline = time.monotonic() + TIMEOUT
    while any(os.path.exists(f"/proc/{p}") for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids if os.path.exists(f"/proc/{p}")], "its workers live on"


@beamlet.remote(num_cpus=0)
def put_when_told(started: str, go: str):
    """Say it started, wait for `go`, then put a large object (kept on its
    node for the driver, owned by this worker) and return its ref."""
    open(f"{started}-{os.getpid()}", "w").close()
    deadline = time.monotonic() + 60
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [beamlet.put(np.ones(1 << 16))]


PINNED_DRIVER = """
import sys
import beamlet
from beamlet.util.scheduling_strategies import NodeAffinitySchedulingStrategy

beamlet.init(address=sys.argv[1], token=sys.argv[2])


@beamlet.remote
def where():
    return beamlet.get_runtime_context().get_node_id()


pin = NodeAffinitySchedulingStrategy(sys.argv[3], soft=False)
print("ran on", beamlet.get(where.options(scheduling_strategy=pin).remote(), timeout=60))
beamlet.shutdown()
"""


def test_idle_workers_of_one_driver_do_not_keep_another_from_a_node(cluster, driver,
                                                                     tmp_path):
    head = cluster.start_head()
    member = cluster.join(head)  # one CPU: at most 4 workers, unless...
    driver(head)
    pin = NodeAffinitySchedulingStrategy(member, soft=False)
    started, go = tmp_path / "started", tmp_path / "go"
    refs = [put_when_told.options(scheduling_strategy=pin).remote(str(started), str(go))
            for _ in range(4)]
    deadline = time.monotonic() + TIMEOUT
    while len(list(tmp_path.glob("started-*"))) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(list(tmp_path.glob("started-*"))) == 4, "the four tasks did not run at once"
    go.touch()
    held = beamlet.get(refs, timeout=GET_TIMEOUT)  # 4 idle workers, each owning an object
    script = tmp_path / "pinned.py"
    script.write_text(PINNED_DRIVER)
    proc = subprocess.run([sys.executable, str(script), head["address"], head["token"], member],
                          env=cluster.env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"ran on {member}" in proc.stdout, proc.stdout + proc.stderr
    assert [beamlet.get(inner[0], timeout=GET_TIMEOUT).sum() for inner in held] == [1 << 16] * 4


# -- placement groups across nodes ------------------------------------------------------
def in_bundle(pg, index: int = -1):
    from beamlet.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    return PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index)


def test_placement_groups_reserve_bundles_across_nodes(cluster, driver):
    """Bundles are reserved on the nodes the strategy says, all or none: a
    STRICT_SPREAD group puts each bundle on a node of its own, and what runs in
    bundle i runs on its node; a group that does not fit waits until a group
    is removed, then PACK spreads over as few nodes as hold it; a STRICT_PACK
    group no node can hold is an error at once; what the driver reserved is
    given back on every node when it leaves."""
    from beamlet.util import placement_group, remove_placement_group
    head = cluster.start_head()
    members = {cluster.join(head), cluster.join(head)}
    nodes = members | {head["node_id"]}
    driver(head)
    spread = placement_group([{"CPU": 1}] * 3, strategy="STRICT_SPREAD")
    assert spread.wait(GET_TIMEOUT)
    assert beamlet.available_resources().get("CPU", 0) == 0
    placed = beamlet.get([where.options(scheduling_strategy=in_bundle(spread, i)).remote()
                          for i in range(3)], timeout=GET_TIMEOUT)
    assert set(placed) == nodes  # one bundle on each node
    again = beamlet.get([where.options(scheduling_strategy=in_bundle(spread, i)).remote()
                         for i in range(3)], timeout=GET_TIMEOUT)
    assert again == placed  # bundle i stays on its node
    with pytest.raises(ValueError, match="STRICT_PACK"):
        placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_PACK")  # no node has 2
    pack = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="PACK")
    assert not pack.wait(0.5)  # every CPU is in `spread`: it waits, none taken
    remove_placement_group(spread)
    assert beamlet.get(pack.ready(), timeout=GET_TIMEOUT) == pack
    assert beamlet.available_resources().get("CPU", 0) == 1
    first, second = beamlet.get([where.options(scheduling_strategy=in_bundle(pack, i)).remote()
                                 for i in range(2)], timeout=GET_TIMEOUT)
    assert first != second and {first, second} <= nodes
    actor = Where.options(scheduling_strategy=in_bundle(pack, 1)).remote()
    assert beamlet.get(actor.node.remote(), timeout=GET_TIMEOUT)[0] == second
    beamlet.shutdown()

    def given_back():
        lines = _node_lines(cluster.status())
        return all("CPU 1.0/1.0" in lines[n] and "_group_" not in lines[n] for n in nodes)

    assert procs.wait_until(given_back, 30, interval=0.5), cluster.status()


# -- the state API across nodes -----------------------------------------------------------
@beamlet.remote
def pid_and_node(path: str | None = None):
    deadline = time.monotonic() + GET_TIMEOUT
    while path is not None and not os.path.exists(path):  # (until the test lets it end)
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)
    return os.getpid(), beamlet.get_runtime_context().get_node_id()


def test_the_state_api_sees_the_tasks_and_workers_of_every_node(cluster, driver, tmp_path):
    """list_tasks follows a task running on a member node (RUNNING, then
    FINISHED with the pid of the worker there), list_workers lists the
    workers of every node, and the timeline has each task on its process."""
    from beamlet.util import state
    head = cluster.start_head()
    member = cluster.join(head, "--resources", '{"far": 1}')
    driver(head)
    path = str(tmp_path / "go")
    far = pid_and_node.options(resources={"far": 1}).remote(path)
    deadline = time.monotonic() + GET_TIMEOUT
    while [r.state for r in state.list_tasks(filters=[("name", "=", "pid_and_node")])] \
            != ["RUNNING"]:
        assert time.monotonic() < deadline, state.list_tasks()
        time.sleep(0.05)
    open(path, "w").close()
    (far_pid, far_node), (near_pid, near_node) = beamlet.get(
        [far, pid_and_node.options(resources={}).remote()], timeout=GET_TIMEOUT)
    assert far_node == member
    rows = state.list_tasks(filters=[("name", "=", "pid_and_node")])
    assert {(r.state, r.worker_pid) for r in rows} == {("FINISHED", far_pid),
                                                       ("FINISHED", near_pid)}
    workers = {r.pid for r in state.list_workers(limit=1000) if r.worker_type == "WORKER"}
    assert {far_pid, near_pid} <= workers
    spans = [e for e in beamlet.timeline() if e["ph"] == "X" and e["name"] == "pid_and_node"]
    assert {e["pid"] for e in spans} == {far_pid, near_pid}


HOLDS_A_CPU = """
import sys
import beamlet
beamlet.init(address=sys.argv[1], token=sys.argv[2])

@beamlet.remote(num_cpus=1, resources={"far": 1})
class Hog:
    def ping(self):
        return "held"

hog = Hog.remote()
print(beamlet.get(hog.ping.remote(), timeout=60), flush=True)
sys.stdin.readline()  # (holds the member's CPU until the test is done)
"""


def test_a_group_whose_node_dies_before_it_is_ready_waits_for_a_node_that_fits(
        cluster, driver, tmp_path):
    """Another driver's actor holds the member's CPU, which this driver does
    not see: the bundle it reserves there waits on the member. When the member
    dies, the group waits (PENDING, its ready ref unresolved, a call in its
    bundle queued) for a node that can hold the bundle; one joins: the bundle
    is reserved there and the call runs there."""
    from beamlet.util import placement_group, placement_group_table
    head = cluster.start_head()
    member = cluster.join(head, "--resources", '{"far": 1}')
    address = _node_lines(cluster.status())[member].split()[2]
    script = tmp_path / "hog.py"
    script.write_text(HOLDS_A_CPU)
    hog = subprocess.Popen([sys.executable, str(script), head["address"], head["token"]],
                           env=cluster.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           text=True)
    try:
        assert hog.stdout.readline().strip() == "held"
        driver(head)
        pg = placement_group([{"CPU": 1, "far": 1}])
        assert not pg.wait(0.5)  # (reserved by this driver; the member has no room yet)
        os.kill(cluster.pid_of(address), signal.SIGKILL)
        assert procs.wait_until(lambda: member not in {
            n["NodeID"] for n in beamlet.nodes() if n["Alive"]}, 30, interval=0.1)
        assert not pg.wait(0.5)
        assert placement_group_table(pg)["state"] == "PENDING"
        call = where.options(scheduling_strategy=in_bundle(pg, 0)).remote()
        newcomer = cluster.join(head, "--resources", '{"far": 1}')
        assert beamlet.get(pg.ready(), timeout=GET_TIMEOUT) == pg
        assert placement_group_table(pg)["state"] == "CREATED"
        assert beamlet.get(call, timeout=GET_TIMEOUT) == newcomer
    finally:
        try:
            hog.communicate("\n", timeout=TIMEOUT)
        finally:
            if hog.poll() is None:
                hog.kill()
                hog.communicate()


def test_ready_refs_of_a_group_that_never_places_leave_nothing_behind(cluster, driver):
    """Each ``pg.ready()`` waits for the group's ready value: one let go of
    before the group is placed (a wait that timed out) stops waiting, so a
    driver polling a group that never places holds nothing for each poll;
    the group's removal fails the ready refs still held."""
    from beamlet.util import placement_group, remove_placement_group
    head = cluster.start_head()
    driver(head)
    holder = placement_group([{"CPU": 1}])
    assert holder.wait(GET_TIMEOUT)
    starved = placement_group([{"CPU": 1}])  # (fits the cluster, never while `holder` is)
    for _ in range(20):
        assert not starved.wait(0.01)
    store = runtime.current().backend.object_store
    assert store._indexed.get(starved._ready_id, []) == []
    held = starved.ready()
    remove_placement_group(starved)
    with pytest.raises(Exception, match="removed"):
        beamlet.get(held, timeout=GET_TIMEOUT)
    assert store._indexed.get(starved._ready_id, []) == []
    remove_placement_group(holder)


@beamlet.remote(max_retries=2)
def node_once(go: str):
    """Runs until the file `go` exists (or a minute passes); its node's id."""
    deadline = time.monotonic() + GET_TIMEOUT
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.02)
    return beamlet.get_runtime_context().get_node_id()


def test_bundles_lost_with_their_node_are_placed_again_when_a_node_fits(
        cluster, driver, tmp_path):
    """A node holding a bundle of a STRICT_SPREAD group is SIGKILLed: the group
    is RESCHEDULING (as in Ray), a ready ref asked for now unresolved (one
    from before keeps its value: each ``pg.ready()`` is a fresh ref, as in
    Ray), and, no alive node without a bundle of it having room, it waits; the actor of the other
    bundle lives on. A node that fits joins: the lost bundle is reserved
    there, the group is CREATED again, the task that was running in the bundle
    runs again there (max_retries), and so do what was queued for the bundle
    meanwhile and its actor (max_restarts), fresh."""
    from beamlet.util import placement_group, placement_group_table
    head = cluster.start_head()
    members = [cluster.join(head, "--resources", '{"member": 1}') for _ in range(2)]
    driver(head)
    pg = placement_group([{"CPU": 1, "member": 1}] * 2, strategy="STRICT_SPREAD")
    assert beamlet.get(pg.ready(), timeout=GET_TIMEOUT) == pg
    assert placement_group_table(pg)["state"] == "CREATED"
    homes = beamlet.get([where.options(scheduling_strategy=in_bundle(pg, i)).remote()
                         for i in range(2)], timeout=GET_TIMEOUT)
    assert sorted(homes) == sorted(members)
    actors = [Where.options(num_cpus=0, max_restarts=1,
                            scheduling_strategy=in_bundle(pg, i)).remote() for i in range(2)]
    assert beamlet.get([a.node.remote() for a in actors], timeout=GET_TIMEOUT) == \
        [(homes[0], 1), (homes[1], 1)]
    go = tmp_path / "go"
    running = node_once.options(scheduling_strategy=in_bundle(pg, 1)).remote(str(go))
    before = pg.ready()
    assert pg.ready() != before  # (a fresh ref per call)
    address = _node_lines(cluster.status())[homes[1]].split()[2]
    os.kill(cluster.pid_of(address), signal.SIGKILL)
    assert procs.wait_until(lambda: placement_group_table(pg)["state"] == "RESCHEDULING",
                            30, interval=0.1), placement_group_table(pg)
    assert not pg.wait(0.5)  # (the head has no "member": it cannot hold the bundle)
    during = pg.ready()
    assert beamlet.wait([during], timeout=0.5)[0] == []
    assert beamlet.get(before, timeout=GET_TIMEOUT) == pg
    queued = where.options(scheduling_strategy=in_bundle(pg, 1)).remote()
    call = actors[1].node.remote()
    assert beamlet.wait([running, queued, call], timeout=0.5)[0] == []
    assert beamlet.get(actors[0].node.remote(), timeout=GET_TIMEOUT) == (homes[0], 2)
    newcomer = cluster.join(head, "--resources", '{"member": 1}')
    assert beamlet.get(during, timeout=GET_TIMEOUT) == pg
    assert beamlet.get(pg.ready(), timeout=GET_TIMEOUT) == pg
    assert placement_group_table(pg)["state"] == "CREATED"
    go.touch()
    assert beamlet.get([running, queued], timeout=GET_TIMEOUT) == [newcomer] * 2
    assert beamlet.get(call, timeout=GET_TIMEOUT) == (newcomer, 1)
    assert beamlet.get(where.options(scheduling_strategy=in_bundle(pg, 0)).remote(),
                       timeout=GET_TIMEOUT) == homes[0]


def test_lost_bundles_join_the_group_on_a_node_that_holds_some(cluster, driver):
    """A SPREAD group has a bundle on each node; the member dies: its bundle is
    reserved on the head beside the other one (the head adds it to the group
    it holds), and bundle 1's calls run there. A STRICT_PACK group wholly on
    the member moves whole: it waits (RESCHEDULING) until the head has room
    for all its bundles, then both are reserved there."""
    from beamlet.util import placement_group, placement_group_table, remove_placement_group
    head = cluster.start_head("--num-cpus", "2")
    member = cluster.join(head, "--num-cpus", "3")
    address = _node_lines(cluster.status())[member].split()[2]
    driver(head)
    spread = placement_group([{"CPU": 1}] * 2, strategy="SPREAD")
    assert beamlet.get(spread.ready(), timeout=GET_TIMEOUT) == spread
    homes = beamlet.get([where.options(scheduling_strategy=in_bundle(spread, i)).remote()
                         for i in range(2)], timeout=GET_TIMEOUT)
    assert sorted(homes) == sorted([head["node_id"], member])
    lost = homes.index(member)
    packed = placement_group([{"CPU": 1}] * 2, strategy="STRICT_PACK")
    assert beamlet.get(packed.ready(), timeout=GET_TIMEOUT) == packed
    assert beamlet.get(where.options(scheduling_strategy=in_bundle(packed, 0)).remote(),
                       timeout=GET_TIMEOUT) == member  # (the head has one CPU left)
    os.kill(cluster.pid_of(address), signal.SIGKILL)
    assert beamlet.get(where.options(scheduling_strategy=in_bundle(spread, lost)).remote(),
                       timeout=GET_TIMEOUT) == head["node_id"]
    assert beamlet.get(spread.ready(), timeout=GET_TIMEOUT) == spread
    assert placement_group_table(spread)["state"] == "CREATED"
    assert beamlet.get([where.options(scheduling_strategy=in_bundle(spread)).remote()
                        for _ in range(2)], timeout=GET_TIMEOUT) == [head["node_id"]] * 2
    assert placement_group_table(packed)["state"] == "RESCHEDULING"
    assert not packed.wait(0.5)  # (the head's two CPUs are in `spread`)
    moved = [where.options(scheduling_strategy=in_bundle(packed, i)).remote() for i in range(2)]
    remove_placement_group(spread)
    assert beamlet.get(packed.ready(), timeout=GET_TIMEOUT) == packed
    assert placement_group_table(packed)["state"] == "CREATED"
    assert beamlet.get(moved, timeout=GET_TIMEOUT) == [head["node_id"]] * 2
    remove_placement_group(packed)

    def given_back():  # (the head's share of both groups, the one added too)
        line = _node_lines(cluster.status())[head["node_id"]]
        return "CPU 2.0/2.0" in line and "_group_" not in line

    assert procs.wait_until(given_back, 30, interval=0.5), cluster.status()

@beamlet.remote(resources={"producer": 1}, _generator_backpressure_num_objects=4)
def produce_far(n):
    yield from range(n)


@beamlet.remote(resources={"consumer": 1})
def consume_far(n):
    return sum(beamlet.get(ref, timeout=GET_TIMEOUT) for ref in produce_far.remote(n))


def test_a_stream_consumed_in_a_task_on_another_node(cluster, driver):
    """A task consumes a generator whose producer runs on another node, held
    back by backpressure: the consumer's acknowledgements reach the producer."""
    head = cluster.start_head("--resources", '{"consumer": 1}')
    cluster.join(head, "--resources", '{"producer": 1}')
    driver(head)
    assert beamlet.get(consume_far.remote(200), timeout=GET_TIMEOUT) == sum(range(200))


@beamlet.remote(resources={"slow": 1})
def long_task(go: str):
    """Runs until the file `go` exists (or a minute passes); its node's id."""
    deadline = time.monotonic() + 60
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.05)
    return beamlet.get_runtime_context().get_node_id()


@beamlet.remote
def short_task():
    return beamlet.get_runtime_context().get_node_id()


def paced_out(scheduler) -> bool:
    """Whether the driver's `scheduler` forgot every node's pace: no node's
    window has room for a task beyond what its resources hold."""
    with scheduler.lock:
        now = time.monotonic()
        return all(node.window(now) == 0 for node in scheduler.nodes)


def test_work_queued_behind_a_long_task_spills_to_a_free_node(cluster, driver, tmp_path):
    # Spillback: the driver sends a node no more than it can run plus its recent
    # pace; the rest waits in the driver for the first node that can take it.
    head = cluster.start_head("--num-cpus", "0")
    slow = cluster.join(head, "--resources", '{"slow": 1}')
    free = cluster.join(head)
    driver(head)
    pin = NodeAffinitySchedulingStrategy(free, soft=False)
    assert beamlet.get([short_task.options(scheduling_strategy=pin).remote()
                        for _ in range(4)], timeout=GET_TIMEOUT) == [free] * 4  # (warm)
    go = tmp_path / "go"
    long_ref = long_task.remote(str(go))  # the slow node's only CPU, until told
    try:
        # Each of these fits either node; none may wait behind the long task.
        shorts = [short_task.remote() for _ in range(12)]
        assert beamlet.get(shorts, timeout=GET_TIMEOUT) == [free] * 12
        assert beamlet.wait([long_ref], timeout=0)[0] == [], "the long task ended early"
    finally:
        go.touch()
    assert beamlet.get(long_ref, timeout=GET_TIMEOUT) == slow
    # Cancelling a task the driver holds (or, if the slow node finished nothing
    # for HOLD_MAX meanwhile, one it sent there after all) fails it.
    go.unlink()
    scheduler = runtime.current().backend.scheduler
    assert procs.wait_until(lambda: paced_out(scheduler), 30, interval=0.05)
    blocker = long_task.remote(str(go))
    held = long_task.remote(str(go))
    beamlet.cancel(held)
    with pytest.raises(exc.TaskCancelledError):
        beamlet.get(held, timeout=GET_TIMEOUT)
    go.touch()
    assert beamlet.get(blocker, timeout=GET_TIMEOUT) == slow


@beamlet.remote
def consume_from(queue, timeout: float):
    """Blocks in get on a queue (an actor's call) for a list of refs, then on them."""
    refs = queue.get(timeout=timeout)
    return sum(beamlet.get(refs, timeout=timeout))


@beamlet.remote
def produce(value: int) -> int:
    return value


def test_held_tasks_go_to_a_node_whose_task_waits_for_them(cluster, driver, monkeypatch):
    # Spillback: a task blocked in get lends its CPU to its node's other tasks,
    # and the node tells the driver, which sends the tasks it holds there at
    # once. Here the node's one CPU is the consumer's, which waits (in get) for
    # tasks submitted after it, which the driver holds (the node finished
    # nothing yet: its window is 0). With the stall rule out of the way (an
    # hour), only the node's word on the lent CPU lets them go.
    monkeypatch.setenv("BEAMLET_SPILLBACK_HOLD_MAX", "3600")
    head = cluster.start_head("--num-cpus", "0")
    cluster.join(head, "--num-cpus", "1")
    driver(head)
    queue = Queue(actor_options={"num_cpus": 0})
    consumer = consume_from.remote(queue, GET_TIMEOUT)
    producers = [produce.remote(i) for i in range(1, 4)]
    queue.put(producers)
    assert beamlet.get(consumer, timeout=GET_TIMEOUT) == 6
    assert beamlet.get(producers, timeout=GET_TIMEOUT) == [1, 2, 3]


@pytest.mark.parametrize("locality_wait", ["3600", "0.2"])
def test_a_held_task_goes_to_the_node_with_its_large_argument(cluster, driver, monkeypatch,
                                                              tmp_path, locality_wait):
    # Spillback and locality: both nodes are busy (their windows are 0), so the
    # driver holds the two tasks submitted next: `near`, whose 50 MB argument
    # is on node b, and `other`. Node a frees first: `other` goes there, while
    # `near` waits for b (for BEAMLET_LOCALITY_WAIT). Waiting an hour, it runs
    # on b once b frees; waiting 0.2 s, it does not starve while b stays busy:
    # a, which is free, runs it. (The stall rule is out of the way: an hour.)
    monkeypatch.setenv("BEAMLET_SPILLBACK_HOLD_MAX", "3600")
    monkeypatch.setenv("BEAMLET_LOCALITY_WAIT", locality_wait)
    head = cluster.start_head("--num-cpus", "0")
    a = cluster.join(head, "--resources", '{"a": 1}')
    b = cluster.join(head, "--resources", '{"b": 1}')
    driver(head)
    array = make_array.options(resources={"b": 1}).remote(50)
    assert beamlet.wait([array], timeout=GET_TIMEOUT)[0] == [array]  # (made; kept on b)
    scheduler = runtime.current().backend.scheduler
    assert procs.wait_until(lambda: paced_out(scheduler), 30, interval=0.05)  # (b's too)
    go_a, go_b = tmp_path / "a", tmp_path / "b"
    busy_a = long_task.options(resources={"a": 1}).remote(str(go_a))
    busy_b = long_task.options(resources={"b": 1}).remote(str(go_b))
    near = checksum.options(resources={}).remote(array)
    other = short_task.remote()
    assert len(scheduler.held_tasks) == 2, "the driver did not hold them (the test's premise)"
    try:
        go_a.touch()
        assert beamlet.get([busy_a, other], timeout=GET_TIMEOUT) == [a, a]
        if locality_wait == "0.2":
            assert beamlet.get(near, timeout=GET_TIMEOUT)[0] == a
            assert beamlet.wait([busy_b], timeout=0)[0] == []
        else:
            assert beamlet.wait([near], timeout=0.5)[0] == []
    finally:
        go_b.touch()
    assert beamlet.get(busy_b, timeout=GET_TIMEOUT) == b
    node, total, nbytes = beamlet.get(near, timeout=GET_TIMEOUT)
    assert (node, nbytes) == (b if locality_wait == "3600" else a, 50 << 20)


def test_a_bad_locality_wait_is_refused_at_init(cluster, driver, monkeypatch):
    head = cluster.start_head()
    monkeypatch.setenv("BEAMLET_LOCALITY_WAIT", "-1")
    with pytest.raises(ValueError, match="BEAMLET_LOCALITY_WAIT"):
        driver(head)


def test_a_bad_spillback_hold_max_is_refused_at_init(cluster, driver, monkeypatch):
    head = cluster.start_head()
    monkeypatch.setenv("BEAMLET_SPILLBACK_HOLD_MAX", "soon")
    with pytest.raises(ValueError, match="BEAMLET_SPILLBACK_HOLD_MAX"):
        driver(head)


# -- direct driver -> actor-worker channels (backends/zmq/direct.py) ---------------------
@beamlet.remote(resources={"far": 1})
class Counter:
    """Counts its calls: each answer is the count so far (and what it was given)."""

    def __init__(self):
        self.calls = []

    def add(self, x=None):
        self.calls.append(x)
        return len(self.calls), x

    def pid(self):
        return os.getpid()

    def node(self):
        return beamlet.get_runtime_context().get_node_id()

    def big(self, n):
        return np.ones(n, dtype=np.uint8)

    def holding(self):
        return [beamlet.put(len(self.calls))]

    def submit(self, path: str):
        """Submit a task that waits for `path`, and keep it; its return id (hex)."""
        self.nested = getattr(self, "nested", []) + [_until_file.remote(path)]
        return self.nested[-1].hex()

    def nested_values(self):
        return beamlet.get(self.nested, timeout=60)

    def spawn(self, path: str, here: str, there: str):
        """Submit a task pinned to node `here` and one to `there`, each of
        which submits one pinned to the other node (waiting for `path`), and
        wait for them."""
        self.spawned = [_spawning.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            a, soft=False)).remote(path, b) for a, b in ((here, there), (there, here))]
        # (Kept: a cancel before this line, which the children's progress does not
        # rule out on a loaded machine, would leave `spawned_refs` nothing to return.)
        open(path + ".kept", "w").close()
        return beamlet.get(self.spawned, timeout=60)

    def spawned_refs(self):
        return self.spawned

    def slow(self, marker: str, seconds: float):
        """Its pid, after writing it to `marker` (then `seconds` of sleep)."""
        with open(marker + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(marker + ".tmp", marker)
        time.sleep(seconds)
        return os.getpid()


@beamlet.remote(num_cpus=0)
def _until_file(path: str):
    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)
    return 1


@beamlet.remote(num_cpus=0)
def _spawning(path: str, node_id: str):
    """Submit `_until_file(path)` pinned to node `node_id`, and wait for it."""
    return beamlet.get(_until_file.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        node_id, soft=False)).remote(path), timeout=60)


def _channel(actor):
    """The driver's direct channel to `actor`'s worker, once open (None: none)."""
    hub = runtime.current().backend.direct
    channel = hub.by_actor.get(actor._actor_id)
    return channel if channel is not None and channel.state == "open" else None


def _open_channel(actor, timeout: float = 30.0):
    """Call `actor` until a call went over its direct channel; the channel. (An
    open channel alone is not enough: the driver sends calls through the node
    until the last one it sent there is answered, which may come after its
    result.)"""
    def direct():
        channel = _channel(actor)
        sent = channel.sent if channel is not None else None
        beamlet.get(actor.add.remote("warm-up"), timeout=GET_TIMEOUT)
        return channel is not None and channel.sent > sent
    assert procs.wait_until(direct, timeout, interval=0.05), "no call went over a direct channel"
    return _channel(actor)


def test_actor_calls_go_over_a_direct_channel_in_order_with_those_through_the_node(
        cluster, driver):
    head = cluster.start_head()
    cluster.join(head, "--resources", '{"far": 1}')
    driver(head)
    counter = Counter.remote()
    channel = _open_channel(counter)
    assert channel.pid == beamlet.get(counter.pid.remote(), timeout=GET_TIMEOUT)
    sent = channel.sent
    assert beamlet.get(counter.add.remote(7), timeout=GET_TIMEOUT)[1] == 7
    assert channel.sent == sent + 1  # (it went over the channel)
    # Inline calls (direct), calls with a ref (through the node), a large result and
    # one holding a ref (both through the node's store), mixed: answered in order.
    ref = beamlet.put("by-ref")
    refs = []
    for i in range(60):
        refs.append(counter.add.remote(ref if i % 20 == 10 else i))
    big = counter.big.remote(3 << 20)
    refs += [counter.add.remote(i) for i in range(60, 80)]
    holding = counter.holding.remote()
    refs += [counter.add.remote(i) for i in range(80, 100)]
    answers = beamlet.get(refs, timeout=GET_TIMEOUT)
    counts = [n for n, _ in answers]
    assert counts == sorted(counts) and len(set(counts)) == len(counts), counts
    assert [x for _, x in answers] == [("by-ref" if i % 20 == 10 and i < 60 else i)
                                       for i in range(100)]
    assert beamlet.get(big, timeout=GET_TIMEOUT).sum() == 3 << 20
    inner = beamlet.get(holding, timeout=GET_TIMEOUT)
    assert beamlet.get(inner[0], timeout=GET_TIMEOUT) == counts[79]  # (in its place)
    # The calls before the first with a ref went direct; the rest of the burst through
    # the node (behind it); once all are answered, calls go direct again.
    assert channel.sent >= sent + 10
    sent = channel.sent
    assert beamlet.get(counter.add.remote("again"), timeout=GET_TIMEOUT)[1] == "again"
    assert channel.sent == sent + 1 and _channel(counter) is channel
    # A direct call can be cancelled: its worker is interrupted.
    marker = os.path.join(cluster.state_dir, "slow")
    slow = counter.slow.remote(marker, 30)
    assert procs.wait_until(lambda: os.path.exists(marker), 30)
    queued = counter.add.remote(ref)  # (through the node: it waits behind the call in flight)
    beamlet.cancel(queued)
    with pytest.raises(exc.TaskCancelledError):
        beamlet.get(queued, timeout=GET_TIMEOUT)
    beamlet.cancel(slow)
    with pytest.raises((exc.TaskCancelledError, exc.TaskError)):
        beamlet.get(slow, timeout=GET_TIMEOUT)
    # Both end as cancelled tasks (Ray's FAILED, TASK_CANCELLED), not failed ones.
    from beamlet.util import state
    rows = state.list_tasks(filters=[("name", "=", "Counter.slow")])
    rows += state.list_tasks(filters=[("name", "=", "Counter.add"), ("state", "=", "FAILED")],
                             limit=1000)
    assert [(r.state, r.error_type) for r in rows] == [("FAILED", "TASK_CANCELLED")] * 2, rows
    assert beamlet.get(counter.add.remote("after"), timeout=GET_TIMEOUT)[1] == "after"


def test_a_direct_call_that_submits_tasks_ends_after_its_driver_has_them_and_cancels_them(
        cluster, driver):
    """A call over a direct channel that submits a nested task is seen to end
    only once the task reached the driver that owns it (through the actor's
    node), as through the node: the worker answers such a call through the
    node, behind its submission, not on the channel, which could overtake it
    (a detached actor's creator could then leave before it got the task).
    cancel() of such a call (recursive, the default, as in Ray) cancels the
    tasks it submitted and the tasks those submitted, on whichever node they
    run (the actor's node never sees the call: its worker cancels them); the
    call ends as cancelled in the state API; force=True is refused, as for
    every actor call."""
    from beamlet.util import state
    head = cluster.start_head()
    member = cluster.join(head, "--resources", '{"far": 1}')
    driver(head)
    counter = Counter.remote()
    channel = _open_channel(counter)
    scheduler = runtime.current().backend.scheduler
    go = os.path.join(cluster.state_dir, "go-nested")
    for _ in range(10):
        sent = channel.sent
        nested = bytes.fromhex(beamlet.get(counter.submit.remote(go), timeout=GET_TIMEOUT))
        assert channel.sent == sent + 1  # (it went over the channel)
        assert nested in scheduler.producer  # (and the driver has its task already)
    with open(go, "w"):
        pass
    assert beamlet.get(counter.nested_values.remote(), timeout=GET_TIMEOUT) == [1] * 10
    # (Their ends are told, though their results came through the node.)
    assert [r.state for r in state.list_tasks(filters=[("name", "=", "Counter.submit")])] \
        == ["FINISHED"] * 10

    go = os.path.join(cluster.state_dir, "go-spawned")
    sent = channel.sent
    call = counter.spawn.remote(go, head["node_id"], member)
    assert channel.sent == sent + 1  # (it went over the channel)
    _cancel_spawned(counter, call, go)


def test_a_call_through_the_node_cancels_the_tasks_it_submitted_on_every_node(cluster, driver):
    """As a direct call's cancel (above), so a call's through its node (here
    an actor's first, before any channel): its worker, not its node, knows
    what the call submitted (an actor may run calls at once), and the node's
    interrupt says `recursive`, so the worker cancels them; the children and
    grandchildren, on both nodes, and the call end cancelled."""
    head = cluster.start_head()
    member = cluster.join(head, "--resources", '{"far": 1}')
    driver(head)
    counter = Counter.remote()
    go = os.path.join(cluster.state_dir, "go-spawned")
    call = counter.spawn.remote(go, head["node_id"], member)
    assert _channel(counter) is None  # (it went through the node)
    _cancel_spawned(counter, call, go)


def _cancel_spawned(counter, call, go: str) -> None:
    """Once `call` (``counter.spawn(go, ...)``) has its two grandchildren
    running, cancel it: it, its two children and their children end
    cancelled (``get`` and the state API); force=True is refused, as for
    every actor call; the actor serves on."""
    from beamlet.util import state

    def states(name: str) -> list:
        return [r.state for r in state.list_tasks(filters=[("name", "=", name)])]

    try:  # (the grandchildren wait on both nodes: all four were submitted)
        assert procs.wait_until(lambda: states("_until_file").count("RUNNING") == 2,
                                GET_TIMEOUT, interval=0.05), state.list_tasks()
        assert procs.wait_until(lambda: os.path.exists(go + ".kept"), GET_TIMEOUT,
                                interval=0.05), "the call never kept its children's refs"
        with pytest.raises(ValueError, match="force=True"):
            beamlet.cancel(call, force=True)
        beamlet.cancel(call)
        with pytest.raises(exc.TaskCancelledError):
            beamlet.get(call, timeout=GET_TIMEOUT)
        for ref in beamlet.get(counter.spawned_refs.remote(), timeout=GET_TIMEOUT):
            with pytest.raises(exc.TaskCancelledError):
                beamlet.get(ref, timeout=GET_TIMEOUT)
        assert procs.wait_until(lambda: "RUNNING" not in states("_until_file"), GET_TIMEOUT,
                                interval=0.05), state.list_tasks()
    finally:
        open(go, "w").close()  # (what was not cancelled ends)
    rows = state.list_tasks(filters=[("name", "=", "_until_file")])[-2:]
    rows += state.list_tasks(filters=[("name", "=", "_spawning")])
    rows += state.list_tasks(filters=[("name", "=", "Counter.spawn")])
    assert len(rows) == 5 and {(r.state, r.error_type) for r in rows} == \
        {("FAILED", "TASK_CANCELLED")}, rows
    assert beamlet.get(counter.add.remote("after"), timeout=GET_TIMEOUT)[1] == "after"


def _kill_mid_call(counter, marker: str):
    """Start a slow call of `counter`, SIGKILL its worker in the middle; its ref."""
    ref = counter.slow.remote(marker, 3)
    assert procs.wait_until(lambda: os.path.exists(marker), 30), "the call never started"
    with open(marker) as f:
        pid = int(f.read())
    os.remove(marker)
    os.kill(pid, signal.SIGKILL)
    return ref, pid


def test_an_actor_whose_worker_dies_mid_call_on_a_direct_channel_restarts_or_dies(
        cluster, driver):
    head = cluster.start_head()
    cluster.join(head, "--resources", '{"far": 1}')
    driver(head)
    marker = os.path.join(cluster.state_dir, "slow")
    # Retries left: the call runs again on the restarted actor.
    counter = Counter.options(max_restarts=1, max_task_retries=1).remote()
    _open_channel(counter)
    ref, pid = _kill_mid_call(counter, marker)
    again = beamlet.get(ref, timeout=GET_TIMEOUT)
    assert again != pid and procs.start_time(again) is not None
    # No restart left: the call in flight, and the calls after, raise ActorDiedError.
    _open_channel(counter)
    ref, pid = _kill_mid_call(counter, marker)
    with pytest.raises(exc.ActorDiedError):
        beamlet.get(ref, timeout=GET_TIMEOUT)
    with pytest.raises(exc.ActorDiedError):
        beamlet.get(counter.add.remote(1), timeout=GET_TIMEOUT)
    # Restarts left but no retries: the call fails (it may have run), the actor lives on.
    other = Counter.options(max_restarts=1).remote()
    _open_channel(other)
    ref, pid = _kill_mid_call(other, marker)
    with pytest.raises(exc.ActorUnavailableError):
        beamlet.get(ref, timeout=GET_TIMEOUT)
    assert beamlet.get(other.pid.remote(), timeout=GET_TIMEOUT) != pid


def test_a_node_starved_for_seconds_stays_the_same_node_and_its_actor_answers(cluster,
                                                                               driver):
    """A node that gets no CPU for a few seconds (its daemon and its actor's
    worker SIGSTOPped for `STARVED` seconds: longer than the 2-3 s after which
    such a node was declared dead, well under the 10 s now) is not declared
    dead: it keeps its id, its actor its state, and nothing rejoins."""
    from beamlet.backends.zmq.transport import dead_after
    assert dead_after() > STARVED * 2  # (the default: no BEAMLET_DEAD_AFTER here)
    head = cluster.start_head()
    member = cluster.join(head, "--resources", '{"far": 1}')
    driver(head)
    counter = Counter.remote()
    assert beamlet.get(counter.node.remote(), timeout=GET_TIMEOUT) == member
    count = beamlet.get(counter.add.remote("before"), timeout=GET_TIMEOUT)[0]
    stopped = [cluster.pid_of(_node_lines(cluster.status())[member].split()[2]),
               beamlet.get(counter.pid.remote(), timeout=GET_TIMEOUT)]
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(STARVED)
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
    assert beamlet.get(counter.add.remote("after"), timeout=GET_TIMEOUT) == (count + 1, "after")
    assert beamlet.get(counter.node.remote(), timeout=GET_TIMEOUT) == member
    out = cluster.status()
    assert "2 node(s) alive, 0 dead" in out and member in _node_lines(out), out
    logs = _logs(cluster)
    assert not any(what in logs for what in ("is dead", "lost the head", "rejoined")), logs


def test_calls_behind_a_direct_channel_to_a_node_declared_dead_go_to_the_restarted_actor(
        cluster, driver):
    head = cluster.start_head()
    cluster.join(head, "--resources", '{"far": 1}')
    cluster.join(head, "--resources", '{"far": 1}')
    driver(head)
    counter = Counter.options(max_restarts=1).remote()
    channel = _open_channel(counter)
    marker = os.path.join(cluster.state_dir, "slow")
    slow = counter.slow.remote(marker, 60)
    assert procs.wait_until(lambda: os.path.exists(marker), 30), "the call never started"
    with open(marker) as f:
        worker = int(f.read())
    queued = counter.add.remote(beamlet.put("by-ref"))  # (a ref: behind the call in flight)
    assert len(channel.after) == 1
    # Its node stops answering (its daemon and the worker stopped: the channel stays
    # up); once the head declares it dead, the call in flight fails, the one queued
    # behind it runs on the restarted actor, and later calls run after it.
    stopped = [cluster.pid_of(channel.node.address), worker]
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(exc.ActorUnavailableError):
            beamlet.get(slow, timeout=GET_TIMEOUT)
        later = counter.add.remote("later")
        assert beamlet.get(queued, timeout=GET_TIMEOUT) == (1, "by-ref")
        assert beamlet.get(later, timeout=GET_TIMEOUT) == (2, "later")
        assert channel.state == "closed" and _channel(counter) is not channel
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGKILL)


def test_a_stopped_actor_worker_holds_up_no_call_of_another_actor(cluster, driver,
                                                                  monkeypatch):
    from beamlet.backends.zmq import direct
    monkeypatch.setattr(direct, "SEND_TIMEOUT", 600.0)  # (it stays stopped, not lost)
    head = cluster.start_head()
    cluster.join(head, "--resources", '{"far": 1}')
    driver(head)
    stopped, other = (Counter.options(resources={"far": 0.3}).remote() for _ in range(2))
    channel = _open_channel(stopped)
    _open_channel(other)
    before = beamlet.get(stopped.add.remote("before"), timeout=GET_TIMEOUT)[0]
    pid = beamlet.get(stopped.pid.remote(), timeout=GET_TIMEOUT)
    hub = runtime.current().backend.direct
    arg = b"a" * (900 << 10)  # (a direct call's: under CALL_MAX)
    refs: list = []
    os.kill(pid, signal.SIGSTOP)
    try:
        # More than its sockets hold: the driver keeps the rest, sending it later.
        submitter = threading.Thread(
            target=lambda: refs.extend(stopped.add.remote(arg) for _ in range(40)), daemon=True)
        submitter.start()
        submitter.join(GET_TIMEOUT)
        assert not submitter.is_alive(), "submitting calls waited for the stopped worker"
        assert channel.wire in hub._flushing and channel.state == "open"
        answered = threading.Event()
        threading.Thread(target=lambda: beamlet.get(other.add.remote("b"), timeout=GET_TIMEOUT)
                         and answered.set(), daemon=True).start()
        assert answered.wait(GET_TIMEOUT), "a call of another actor waited for the stopped one"
    finally:
        os.kill(pid, signal.SIGCONT)
    # Once it reads again, every call arrives, in order.
    answers = beamlet.get(refs, timeout=GET_TIMEOUT)
    assert [n for n, _ in answers] == list(range(before + 1, before + 41))
    assert all(x == arg for _, x in answers) and channel.state == "open"


def test_answers_a_lost_direct_channel_holds_unread_are_not_lost_with_it(cluster, driver):
    import select
    head = cluster.start_head()
    cluster.join(head, "--resources", '{"far": 1}')
    driver(head)
    counter = Counter.options(max_restarts=1, max_task_retries=1).remote()
    channel = _open_channel(counter)
    count = beamlet.get(counter.add.remote("before"), timeout=GET_TIMEOUT)[0]
    # (Nobody reads the channel: as if the kill came before the driver's I/O thread
    # read the answer.)
    runtime.current().backend._ep.unregister(channel.wire.fileno())
    ref = counter.add.remote("answered")
    assert select.select([channel.wire.fileno()], [], [], GET_TIMEOUT)[0], "no answer"
    beamlet.kill(counter)
    assert beamlet.get(ref, timeout=GET_TIMEOUT) == (count + 1, "answered")


@beamlet.remote(resources={"far": 0.3})
class Forger:
    """An actor whose worker tries to finish another actor's call (as a
    compromised worker could): it sends its node the results of a direct call
    it was never sent, naming the other call's ids."""

    def add(self, x=None):  # (for _open_channel)
        return 1, x

    def forge(self, task_id: bytes, return_id: bytes, tag: bytes):
        import gc

        from beamlet.backends.local import protocol as LP
        from beamlet.backends.local import worker as W
        from beamlet.core.serialization import serialize
        from beamlet.core.task_spec import ACTOR_METHOD, TaskSpec
        me = next(o for o in gc.get_objects() if isinstance(o, W.Worker))
        _, token, *_ = next(iter(me._direct_calls.values()))  # (this call's channel)
        actor_id = beamlet.get_runtime_context().get_actor_id()
        spec = TaskSpec(task_id, ACTOR_METHOD, b"f" * 16, "Counter.slow", [], {}, (return_id,),
                        {}, 0, False, bytes.fromhex(actor_id), "slow", {}, b"c" * 16, 0, {},
                        None, None)
        entries = [serialize("forged")]
        me.backend.send(LP.DirectDone(token, spec.fields(), entries, False, tag))
        return "sent"


def test_a_worker_cannot_finish_a_call_it_was_not_sent(cluster, driver):
    head = cluster.start_head()
    cluster.join(head, "--resources", '{"far": 1}')
    driver(head)
    victim = Counter.options(resources={"far": 0.3}).remote()
    forger = Forger.remote()
    _open_channel(victim)
    _open_channel(forger)
    marker = os.path.join(cluster.state_dir, "slow")
    slow = victim.slow.remote(marker, 5)  # (a direct call: its node does not know of it)
    assert procs.wait_until(lambda: os.path.exists(marker), 30), "the call never started"
    task_id = runtime.current().backend.scheduler.producer[slow.binary()]
    # (Without the driver's tag for that call on its channel: its node refuses it and
    # drops the worker; the call's own result arrives.)
    try:  # (its answer may or may not come before its node drops it)
        assert beamlet.get(forger.forge.remote(task_id, slow.binary(), b"t" * 16),
                           timeout=GET_TIMEOUT) == "sent"
    except exc.ActorDiedError:
        pass
    with open(marker) as f:
        assert beamlet.get(slow, timeout=GET_TIMEOUT) == int(f.read())
    assert beamlet.get(victim.add.remote("after"), timeout=GET_TIMEOUT)[1] == "after"


def test_a_peer_without_the_key_is_refused_by_a_drivers_direct_port(cluster, driver,
                                                                   tmp_path):
    import pickle
    import socket

    from beamlet.backends.zmq import direct
    from beamlet.core import auth
    head = cluster.start_head()
    cluster.join(head, "--resources", '{"far": 1}')
    driver(head)
    hub = runtime.current().backend.direct
    host, port = hub.address.rsplit(":", 1)
    touched = tmp_path / "unpickled"

    class Bomb:
        def __reduce__(self):
            return (open, (str(touched), "w"))

    def refused(payload: bytes) -> bool:
        """Whether the driver closes the connection after `payload`, unread."""
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.settimeout(30)
            try:
                sock.sendall(payload)
                while sock.recv(65536):
                    pass  # (its challenge, then the end)
            except (ConnectionResetError, BrokenPipeError):
                pass
            return True

    bomb = pickle.dumps(Bomb(), 5)
    assert refused(bomb)  # a pickle as it is
    assert refused(len(bomb).to_bytes(4, "little") + bomb)  # a pickle as a frame
    assert refused(b"\xff" * (8 << 20))  # more than a handshake frame: cut off at once
    assert not touched.exists()
    # A wrong key: the handshake fails, both ways.
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        with pytest.raises(auth.AuthenticationError):
            auth.join(sock, b"k" * 32, direct.VERSION, timeout=10)
    # A worker holds only the keys of the channels it was asked to open. With one
    # of them (or even the cluster-wide key its node derives them from) it cannot
    # get another driver's process to unpickle anything: the channel must be one
    # the driver has pending, its own key proven, and its hello is raw bytes.
    parent = direct.channel_key(bytes.fromhex(head["token"]))
    counter = Counter.remote()
    asked = _open_channel(counter)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        with pytest.raises(auth.AuthenticationError):  # (no channel named: the old way)
            auth.join(sock, parent, direct.VERSION, timeout=10)
    other = b"o" * 16  # (a channel of another job, or of another driver)
    with pytest.raises((exc.BackendError, EOFError)):  # (an id not pending: closed)
        wire = direct.connect(hub.address, direct.channel_secret(parent, other), other,
                              timeout=10)
        wire.send(Bomb())
        assert wire.wait(30)
        wire.recv_all()
    # A pending channel's id with another channel's key: the handshake fails.
    token = b"p" * 16
    with runtime.current().backend.scheduler.lock:
        pending = direct.Channel(b"a" * 16, None, token, [],
                                 direct.channel_secret(hub.key, token))
        hub.pending[pending.id] = pending
    try:
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(direct._GREETING + pending.id)
            with pytest.raises(auth.AuthenticationError):
                auth.join(sock, direct.channel_secret(parent, other), direct.VERSION,
                          timeout=10)
        # Its own key, and a pickle for a hello: refused, not unpickled.
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(direct._GREETING + pending.id)
            shake = auth.join(sock, pending.key, direct.VERSION, timeout=10)
            wire = direct.Wire(sock, shake.session_key, driver=False)
            wire.send(("hello", Bomb(), 1))
            wire.send(Bomb())
            assert wire.wait(30)
            with pytest.raises(EOFError):
                wire.recv_all()
    finally:
        hub.pending.pop(pending.id, None)
    assert not touched.exists()
    # The channels that were asked for still work.
    assert beamlet.get(counter.add.remote(1), timeout=GET_TIMEOUT)[1] == 1
    assert asked.state == "open" and _channel(counter) is asked


def test_peers_that_send_nothing_hold_up_no_direct_channel(cluster, driver):
    import socket
    head = cluster.start_head()
    cluster.join(head, "--resources", '{"far": 1}')
    driver(head)
    host, port = runtime.current().backend.direct.address.rsplit(":", 1)
    # (Each would hold the driver's port for the handshake's time, one after another.)
    idle = [socket.create_connection((host, int(port)), timeout=30) for _ in range(12)]
    try:
        counter = Counter.remote()
        channel = _open_channel(counter)
        assert beamlet.get(counter.add.remote(1), timeout=GET_TIMEOUT)[1] == 1
        assert channel.state == "open"
    finally:
        for sock in idle:
            sock.close()


def test_a_direct_channel_that_never_opens_is_given_up_and_asked_for_later_and_later(
        cluster, driver, monkeypatch):
    from beamlet.backends.zmq import direct
    monkeypatch.setattr(direct, "OPEN_TIMEOUT", 0.0)  # (given up at the next call)
    head = cluster.start_head()
    cluster.join(head, "--resources", '{"far": 1}')
    driver(head)
    hub = runtime.current().backend.direct
    counter = Counter.remote()
    pid = beamlet.get(counter.pid.remote(), timeout=GET_TIMEOUT)
    os.kill(pid, signal.SIGSTOP)  # (it cannot connect: its channel never opens)
    try:
        refs = [counter.add.remote(i) for i in range(3)]  # (asked for, then given up)
        waits = []
        for _ in range(2):
            until = hub.closed_at[counter._actor_id]
            waits.append(until - time.monotonic())
            with runtime.current().backend.scheduler.lock:
                hub.closed_at[counter._actor_id] = 0.0  # (as if that time had passed)
            refs += [counter.add.remote(i) for i in range(2)]
        assert hub.failed[counter._actor_id] == 2 and waits[1] > direct.REOPEN_AFTER * 2
        assert counter._actor_id not in hub.by_actor or \
            hub.by_actor[counter._actor_id].state == "opening"
    finally:
        os.kill(pid, signal.SIGCONT)
    # Every call went through its node, in order; then a channel opens after all.
    assert [n for n, _ in beamlet.get(refs, timeout=GET_TIMEOUT)] == list(range(1, 8))
    monkeypatch.setattr(direct, "OPEN_TIMEOUT", 30.0)
    with runtime.current().backend.scheduler.lock:
        hub.closed_at[counter._actor_id] = 0.0
    _open_channel(counter)
    assert counter._actor_id not in hub.failed


def test_a_driver_forgets_reopen_times_that_passed_once_it_keeps_many():
    """What a driver keeps of its actors' lost channels (when each may be
    asked for again, how many in a row never opened) is bounded: at 4096
    actors, those whose time passed are forgotten (their handles may live on,
    unused: `DirectHub.forget` never runs for them)."""
    from beamlet.backends.zmq import direct
    hub = direct.DirectHub(os.urandom(32), "127.0.0.1", lambda *_: False)
    try:
        actors = [i.to_bytes(16, "big") for i in range(4096)]
        for i, actor_id in enumerate(actors):
            hub.lost(actor_id, opened=i % 3 == 0)  # (the others never opened)
        assert len(hub.closed_at) == 4096 and len(hub.failed) == 4096 - 1366
        passed = actors[::2]
        for actor_id in passed:
            hub.closed_at[actor_id] = 0.0  # (as if their time had passed)
        hub.lost(b"n" * 16, opened=False)
        kept = set(actors[1::2]) | {b"n" * 16}
        assert set(hub.closed_at) == kept
        assert set(hub.failed) == {a for i, a in enumerate(actors) if i % 2 and i % 3} \
            | {b"n" * 16}
    finally:
        hub.close()


def test_a_driver_with_direct_channels_leaves_nothing_behind(cluster, driver):
    import socket
    head = cluster.start_head()
    cluster.join(head, "--resources", '{"far": 1}')
    driver(head)
    counters = [Counter.options(resources={"far": 0.3}).remote() for _ in range(3)]
    for counter in counters:
        _open_channel(counter)
    pids = [beamlet.get(c.pid.remote(), timeout=GET_TIMEOUT) for c in counters]
    address = runtime.current().backend.direct.address
    host, port = address.rsplit(":", 1)
    beamlet.shutdown()  # (the fixture checks this process's threads and descriptors)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, int(port)), timeout=10).close()
    assert not procs.wait_gone(pids, 30)


@beamlet.remote(resources={"far": 1}, max_restarts=2)
class Leaver:
    def work(self, x=None):
        return os.getpid()

    def leave(self):
        beamlet.actor.exit_actor()
        return "not reached"

    def add(self, x=None):  # (for _open_channel)
        return x


def test_exit_actor_over_a_direct_channel_fails_the_calls_behind_it(cluster, driver):
    head = cluster.start_head()
    cluster.join(head, "--resources", '{"far": 1}')
    driver(head)
    leaver = Leaver.remote()
    channel = _open_channel(leaver)
    pid = beamlet.get(leaver.work.remote(), timeout=GET_TIMEOUT)
    sent = channel.sent
    leaving = leaver.leave.remote()
    queued = [leaver.work.remote(i) for i in range(3)]
    assert channel.sent == sent + 4  # (all four went over the channel)
    for ref in [leaving] + queued:
        with pytest.raises(exc.ActorDiedError, match="exit_actor()") as info:
            beamlet.get(ref, timeout=GET_TIMEOUT)
        assert "kill" not in str(info.value)
    with pytest.raises(exc.ActorDiedError, match="exit_actor()"):
        beamlet.get(leaver.work.remote(), timeout=GET_TIMEOUT)
    assert procs.wait_gone([pid], 30) == []


def test_direct_calls_can_be_turned_off_and_a_bad_setting_is_refused(cluster, driver,
                                                                     monkeypatch):
    head = cluster.start_head()
    cluster.join(head, "--resources", '{"far": 1}')
    monkeypatch.setenv("BEAMLET_DIRECT_CALLS", "yes")
    with pytest.raises(ValueError, match="BEAMLET_DIRECT_CALLS"):
        driver(head)
    monkeypatch.setenv("BEAMLET_DIRECT_CALLS", "0")
    driver(head)
    assert runtime.current().backend.direct is None
    counter = Counter.remote()
    answers = [beamlet.get(counter.add.remote(i), timeout=GET_TIMEOUT) for i in range(5)]
    assert answers == [(i + 1, i) for i in range(5)]
