"""Shared fixtures: the semantic suite is written once and runs on every backend.

``backend`` starts ``beamlet.init(backend=<name>, num_cpus=2)`` for each name in
``BACKENDS`` and always shuts it down afterwards; a listed backend that cannot
be found fails its tests (with the reason), never skips them. Tests that only
make sense with a capability (tasks running at the same time, in other processes, zero-copy
reads) skip themselves with ``backend.require("parallel")``, which reads the
backend's own capability flags rather than its name. ``start_backend`` and
``inprocess`` are for tests that need one backend or special init options.

A later backend joins the whole suite by adding its name to ``BACKENDS`` (and,
if it lives in a module of its own, to ``BACKEND_MODULES``).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass

import pytest

import beamlet
from beamlet.core import plugins
from beamlet.core import runtime as _runtime

#: The backends the semantic suite runs on: inprocess, local and dask by
#: default (CI's run); ``ray`` and ``cluster`` join with e.g.
#: ``BEAMLET_TEST_BACKENDS=inprocess,local,dask,ray,cluster``. On ray the
#: suite adds some 600-900 CPU-s (a Ray worker process per actor, about 1.7
#: CPU-s each on a slow day): with them CI stopped the suite at its 18-minute
#: guard, and in session 17 it took 1,090-1,700 s on 2 cores here (without
#: them 830 s, 1,620 CPU-s, on the same slow day). test_ray_backend.py
#: and tests/test_cluster*.py always run, on a Ray and clusters of their own.
#: See `no_ray_connection_left_behind` for why an xdist worker once died mid-run.
BACKENDS = [name for name in os.environ.get("BEAMLET_TEST_BACKENDS",
                                            "inprocess,local,dask").split(",") if name]

#: The backends tests/test_scale.py runs on: by default those of `BACKENDS`
#: whose tasks beamlet schedules itself. On an engine (``dask``, ``ray``) a
#: scale test measures the engine's own cost per task (Dask's scheduler and
#: workers: some 3.5 ms of CPU a task, so 100,000 tasks alone take minutes);
#: ``BEAMLET_TEST_SCALE_BACKENDS=dask,ray`` runs them there too.
SCALE_BACKENDS = [name for name in os.environ.get(
    "BEAMLET_TEST_SCALE_BACKENDS",
    ",".join(b for b in BACKENDS if b not in ("dask", "ray"))).split(",") if name]

#: The pytest-xdist group of every test on ``ray``: one process runs them, on
#: one shared Ray (`pytest_collection_modifyitems`).
RAY_GROUP = "ray"

# The module that must exist for a backend to run; checked without importing it.
BACKEND_MODULES = {
    "inprocess": "beamlet.backends.local.inprocess",
    "local": "beamlet.backends.local.driver",
    "dask": "beamlet.backends.dask.backend",
    "ray": "beamlet.backends.ray.backend",
    "cluster": "beamlet.backends.zmq.backend",
}

NUM_CPUS = 2


def backend_missing(name: str) -> str | None:
    """Why `name` cannot run here (None when it can)."""
    module = BACKEND_MODULES.get(name)
    if module is not None:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            return f"backend {name!r} is not written yet ({module} does not exist)"
    if name not in plugins.backend_factories():
        return f"backend {name!r} is not installed"
    return None


def _backend_params():
    return [pytest.param(name, id=name) for name in BACKENDS]


@dataclass(frozen=True)
class BackendInfo:
    """What a test learns about the backend it runs on."""

    name: str
    parallel: bool
    isolated: bool
    zero_copy: bool
    manages_workers: bool
    task_events: bool = False
    placement_groups: bool = False
    concurrency_groups: bool = False
    multi_node: bool = False
    owner_fate_sharing: bool = False
    actors_lend_cpus: bool = True
    prompt_state: bool = True
    streaming_generators: bool = False

    @classmethod
    def current(cls) -> "BackendInfo":
        b = _runtime.current_or_none().backend
        return cls(b.name, bool(b.parallel), bool(b.isolated), bool(b.zero_copy),
                   bool(b.manages_workers), bool(b.task_events), bool(b.placement_groups),
                   bool(b.concurrency_groups), bool(b.multi_node),
                   bool(b.owner_fate_sharing), bool(b.actors_lend_cpus),
                   bool(b.prompt_state), bool(b.streaming_generators))

    def require(self, *flags: str) -> None:
        """Skip the running test unless this backend has every capability flag
        (``parallel``, ``isolated``, ``zero_copy``, ``manages_workers``)."""
        missing = [f for f in flags if not getattr(self, f)]
        if missing:
            pytest.skip(f"needs a backend with {', '.join(missing)}; on {self.name!r} "
                        + "; ".join(_WHY_NOT.get(f, f) for f in missing))


_WHY_NOT = {"parallel": "tasks run one at a time inside .remote()",
            "isolated": "tasks run in the caller's process",
            "zero_copy": "get() returns copies, not shared-memory views",
            "placement_groups": "its scheduler does not reserve placement groups",
            "concurrency_groups": "its actors do not run calls in concurrency groups",
            "manages_workers": "the engine, not beamlet, restarts crashed workers and "
                               "retries their tasks, and actors hold no resources while alive",
            "task_events": "the driver does not see every task end (no state API, no timeline)",
            "actors_lend_cpus": "an actor blocked in get/wait keeps its CPUs (Ray's rule)",
            "streaming_generators": "it does not run generator tasks"}


def _reset() -> None:
    """Leave no runtime behind, whatever a test did."""
    beamlet.shutdown()


@pytest.fixture(params=_backend_params())
def backend_name(request, monkeypatch):
    """The name of a backend to test, without starting it; fails for unavailable ones.
    ``BEAMLET_BACKEND`` is removed from the environment so that only the test decides."""
    reason = backend_missing(request.param)
    if reason:
        pytest.fail(reason)
    monkeypatch.delenv("BEAMLET_BACKEND", raising=False)
    if request.param == "cluster":  # (for the tests that call init() themselves)
        options = _beamlet_cluster.options()
        monkeypatch.setenv("BEAMLET_ADDRESS", options["address"])
        monkeypatch.setenv("BEAMLET_TOKEN", options["token"])
    _reset()
    if request.param == "ray" and "backend" not in request.fixturenames:
        # (The test calls init itself: with `own_init_options` it joins the
        # shared Ray through this process's connection, as a program run after
        # its own ``ray.init`` does; `start_backend` starts a Ray of its own.)
        _ray_cluster.connect()
    try:
        yield request.param
    finally:
        _reset()
        if request.param == "ray":
            _ray_cluster.reset()


class _DaskCluster:
    """One Dask cluster (two single-threaded workers, like ``num_cpus=2``) shared
    by every semantic test on the ``dask`` backend: each test's session joins it
    with a client of its own, and leaves it as it found it at shutdown.
    Starting a cluster per test would cost seconds each."""

    def __init__(self):
        self.cluster = None

    def client(self):
        from distributed import Client

        from beamlet.backends.dask.cluster import Cluster
        if self.cluster is None:
            try:
                # (spare: `reset` restarts workers after many tests)
                self.cluster = Cluster(NUM_CPUS, {}, spare=True)
            except ImportError as err:
                pytest.fail(f"the dask backend needs Dask ({err}): pip install -e '.[test]'")
        # (On the scheduler's event loop, with values fetched from the workers
        # directly, as the backend's own LocalCluster makes its client: messages
        # between the two stay on one thread, which costs about a tenth less
        # CPU per task than a loop thread of the client's own.)
        return Client(self.cluster.address, security=self.cluster.security, timeout=30,
                      loop=self.cluster.loop, direct_to_workers=True)

    def reset(self, client) -> None:
        """Restart the workers still running a task once a test's session has
        shut down. Dask cannot stop a running task (a cancelled one runs on, a
        test's `time.sleep(10e6)` too): left running, it would hold one of the
        two worker threads from every test after it."""
        def tasks_running(dask_worker) -> int:  # (nested: Dask ships it by value)
            return len(dask_worker.active_threads)  # (seceded tasks too)

        busy = [address for address, running in client.run(tasks_running).items() if running]
        if busy:
            self.cluster.restart_workers(busy, timeout=60)

    def stop(self):
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None


_dask_cluster = _DaskCluster()


class _RayCluster:
    """One local Ray (2 CPUs) in a child process, shared by every semantic test
    on the ``ray`` backend. The test process connects to it once (`connect`),
    so each test's ``init(backend="ray")`` uses that connection and leaves it
    at shutdown: a new Ray driver per test would cost seconds each (its
    connection, and new worker processes for its job). The child stops its Ray
    (Ray ends the processes it started) when its standard input closes, and
    removes Ray's session files (a beamlet session's temp dir under its lock,
    so that the next start sweeps them if the run was killed)."""

    _SCRIPT = """if True:
        import json, logging, os, shutil, signal, sys
        # Ray's workers must take SIGINT as Python does by default: Ray's cancel
        # of a running task is a simulated SIGINT, which does nothing in a process
        # that ignores it, and they would inherit SIG_IGN from a pytest started
        # where SIGINT is ignored (`pytest &` in a script).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        import ray
        from beamlet.backends.local.session import SessionLock, sweep
        sweep()
        session = SessionLock()
        temp = session.temp_dir
        try:
            ctx = ray.init(address="local", num_cpus=int(sys.argv[1]), include_dashboard=False,
                           _temp_dir=temp, logging_level=logging.ERROR,
                           _system_config=json.loads(sys.argv[2]))
            print(ctx.address_info["gcs_address"], os.environ.get("RAY_AUTH_MODE", ""),
                  flush=True)
            sys.stdin.read()
            ray.shutdown()
        finally:
            shutil.rmtree(temp, ignore_errors=True)
            session.release()
    """

    #: Ray's system config for the shared Ray (Ray's defaults otherwise).
    #: Idle workers are kept (up to this many) rather than ended after a second:
    #: the next test that needs as many at once (nested tasks blocked in get)
    #: finds them instead of waiting for new ones to start (about a second of
    #: CPU each). The job is the same for every test, so they can serve any.
    SYSTEM_CONFIG = {"num_workers_soft_limit": 10}

    def __init__(self):
        self.process = None
        self.address = None
        self.auth_mode = ""

    def start(self) -> str:
        """The address of the shared Ray (started on first use)."""
        import json
        import subprocess
        import sys
        if self.process is not None and self.process.poll() is not None:
            # Connecting to a Ray whose processes are gone waits in Ray's own GCS
            # client for many minutes: fail at once instead.
            code = self.process.returncode
            self.process = None
            pytest.fail(f"the shared Ray exited (code {code}) before this test")
        if self.process is None:
            repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(
                p for p in (repo, os.environ.get("PYTHONPATH")) if p))
            self.process = subprocess.Popen([sys.executable, "-c", self._SCRIPT, str(NUM_CPUS),
                                             json.dumps(self.SYSTEM_CONFIG)],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            text=True, env=env)
            line = self.process.stdout.readline().strip()  # (Ray's own start timeout applies)
            if ":" not in line:
                self.stop()
                pytest.fail(f"the shared Ray did not start (it said {line!r}): "
                            f"pip install -e '.[test]'")
            self.address, _, self.auth_mode = line.partition(" ")
        return self.address

    def program_env(self) -> dict:
        """What a Ray program run in a subprocess needs in its environment to join
        the shared Ray (its plain ``ray.init()`` reads ``$RAY_ADDRESS``), whatever
        its ``HOME``: Ray's auth mode, and where Ray keeps the token when its
        token auth is on (``~/.ray/auth_token`` of this process's home)."""
        env = {"RAY_ADDRESS": self.start()}
        if self.auth_mode:
            env["RAY_AUTH_MODE"] = self.auth_mode
        token = os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
        if not os.environ.get("RAY_AUTH_TOKEN_PATH") and os.path.exists(token):
            env["RAY_AUTH_TOKEN_PATH"] = token
        return env

    def connect(self) -> None:
        """Connect this process to the shared Ray (once)."""
        import logging
        address = self.start()
        if self.auth_mode:
            # Ray turns token auth on by itself only for a Ray it starts, and reads
            # the mode when it is imported.
            os.environ["RAY_AUTH_MODE"] = self.auth_mode
        import ray as real_ray  # (tests call beamlet "ray")
        if not real_ray.is_initialized():
            real_ray.init(address=address, logging_level=logging.WARNING)

    def reset(self) -> None:
        """Once a test's session has shut down, kill the beamlet actors it left
        in the shared Ray (detached ones outlive their job, as in Ray): the next
        test finds only the control store's actor."""
        import sys
        real_ray = sys.modules.get("ray")
        if real_ray is None or not real_ray.is_initialized() or self.process is None:
            return
        from beamlet.backends.ray.scheduler import ACTOR_PREFIX
        for entry in real_ray.util.list_named_actors(all_namespaces=True):
            if entry["name"].startswith(ACTOR_PREFIX):
                try:
                    real_ray.kill(real_ray.get_actor(entry["name"], namespace=entry["namespace"]))
                except ValueError:
                    pass  # (it ended meanwhile)

    def disconnect(self) -> None:
        """Leave the shared Ray (for tests that start a Ray of their own)."""
        import sys
        real_ray = sys.modules.get("ray")
        if real_ray is not None and real_ray.is_initialized():
            real_ray.shutdown()

    def stop(self):
        import subprocess
        self.disconnect()
        if self.process is not None:
            self.process.stdin.close()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(60)
            self.process.stdout.close()
            self.process = None


_ray_cluster = _RayCluster()


#: The backends whose tests share an engine started once per process, in the
#: order their tests run (`pytest_collection_modifyitems`).
_ENGINE_ORDER = {"ray": 0, "dask": 1}
_SHARED_ENGINES = {"ray": _ray_cluster, "dask": _dask_cluster}


def _backend_of(item) -> str | None:
    """The backend a collected test runs on (its ``backend_name`` parameter), if
    any; ``dask`` for test_control_store's tests of the store that lives in the
    shared Dask cluster's scheduler."""
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return None
    if callspec.params.get("store") == "dask":
        return "dask"
    return callspec.params.get("backend_name")


@pytest.hookimpl(tryfirst=True)  # (before pytest-xdist reads the groups)
def pytest_collection_modifyitems(session, config, items):
    """The tests on ``ray`` run first, then those on ``dask``, each in their own
    order. A shared engine costs CPU for as long as it runs (Ray's daemons and
    idle workers, Dask's scheduler and workers: a tenth of a core or so), so
    each process stops it after its last test on it (`pytest_runtest_teardown`):
    pytest-xdist hands tests out in this order, so none comes after.

    Every test on ``ray`` is in one xdist group (`RAY_GROUP`): one process
    runs them all, on one shared Ray. A shared Ray per process, three at
    once, cost half a core in idle daemons and workers (each idle Ray worker
    takes about 1% of a core, and each Ray kept ten), and started the
    workers each test needs three times. (test_ray_backend.py's tests, on
    Rays of their own, are a group of their own.)"""
    items.sort(key=lambda item: _ENGINE_ORDER.get(_backend_of(item), len(_ENGINE_ORDER)))
    for item in items:
        if _backend_of(item) == "ray":
            item.add_marker(pytest.mark.xdist_group(RAY_GROUP))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """Once the fixtures are torn down: stop the shared engine after the last
    test on it that this process runs (a later one would start it again)."""
    try:
        return (yield)
    finally:
        engine = _backend_of(item)
        if engine in _ENGINE_ORDER and (nextitem is None or _backend_of(nextitem) != engine):
            _SHARED_ENGINES[engine].stop()


class _BeamletCluster:
    """One beamlet cluster (a head without CPUs and one node with two, like
    ``num_cpus=2``, and the head's redis-server: real processes on 127.0.0.1)
    shared by every semantic test on the ``cluster`` backend: each test's driver
    joins it with ``init(address=..., token=...)``. It is started by the
    `Cluster` helper of tests/test_cluster.py, as the cluster tests start
    theirs, and stopped at the end of the session, leaving no process."""

    def __init__(self):
        self.cluster = None
        self.head = None
        self.state = None

    def options(self) -> dict:
        """The `init` options that join the cluster, starting it on first use."""
        if self.head is None:
            import shutil
            import tempfile

            from test_cluster import Cluster
            if shutil.which("redis-server") is None:
                pytest.fail("the cluster backend's tests need redis-server (apt-get install "
                            "redis-server): its head starts one")
            self.state = tempfile.mkdtemp(prefix="beamlet-test-cluster-")
            self.cluster = Cluster(os.path.join(self.state, "state"))
            try:
                # (argparse: the last --num-cpus wins over the helper's own)
                head = self.cluster.start_head("--num-cpus", "0")
                self.cluster.join(head, "--num-cpus", str(NUM_CPUS))
            except BaseException:
                self.stop()
                raise
            self.head = head
        return {"address": self.head["address"], "token": self.head["token"]}

    def stop(self) -> list[int]:
        """Stop the cluster; the pids of its processes still running after that."""
        import shutil

        import procs
        left = []
        if self.cluster is not None:
            self.cluster.run("stop", check=False)
            left = [pid for pid, started in self.cluster.seen if procs.alive((pid, started))]
            shutil.rmtree(self.state, ignore_errors=True)
        self.cluster = self.head = self.state = None
        return left


_beamlet_cluster = _BeamletCluster()


def pytest_sessionfinish(session, exitstatus):
    """Stop the shared clusters. Under pytest-xdist this runs in each worker (each
    has clusters of its own) and then in the controller, which reports what the
    workers' test clusters left (a worker's own exit status and output are lost)."""
    _dask_cluster.stop()
    _ray_cluster.stop()
    left = _beamlet_cluster.stop()
    worker_output = getattr(session.config, "workeroutput", None)
    if worker_output is not None:  # (an xdist worker: tell the controller)
        worker_output["beamlet_cluster_left"] = left
        return
    left += _left_by_workers
    if left:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print(f"\nthe test cluster left processes running after beamlet stop: {left}")


_left_by_workers: list[int] = []


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """(xdist's controller: a worker finished; collect what its test cluster left.)"""
    _left_by_workers.extend(getattr(node, "workeroutput", {}).get("beamlet_cluster_left", ()))


def init_options(name: str, **options) -> dict:
    """The `init` options of a test's backend: ``num_cpus=2``; for ``dask``
    a client of the shared test cluster (closed by `close_client`); for ``ray``
    this process connects to the shared Ray first; for ``cluster`` the address
    and token of the shared beamlet cluster."""
    if name == "dask" and "client" not in options and "address" not in options:
        options.pop("num_cpus", None)
        options["client"] = _dask_cluster.client()
    elif name == "ray" and "address" not in options:
        options.pop("num_cpus", None)
        # (Off by default: it costs CPU. BEAMLET_TEST_RAY_TASK_EVENTS=0 runs the
        # suite as programs run by default, through the plain calls' own path.)
        options.setdefault("task_events", os.environ.get("BEAMLET_TEST_RAY_TASK_EVENTS") != "0")
        _ray_cluster.connect()
    elif name == "cluster" and "address" not in options:
        options.pop("num_cpus", None)
        options.update(_beamlet_cluster.options())
    else:
        options.setdefault("num_cpus", NUM_CPUS)
    return options


def own_init_options(name: str, **options) -> dict:
    """The options of an ``init(backend=name, ...)`` a test calls itself:
    ``num_cpus=2``, but none on ``cluster``, whose nodes bring their resources
    (its driver finds the test cluster through ``BEAMLET_ADDRESS`` and
    ``BEAMLET_TOKEN``, which `backend_name` sets), nor on ``ray``, whose
    driver uses this process's connection to the shared Ray (2 CPUs), which
    `backend_name` makes: a Ray of its own would cost some ten seconds a test."""
    if name not in ("cluster", "ray"):
        options.setdefault("num_cpus", NUM_CPUS)
    if name == "ray":
        options.setdefault("task_events", os.environ.get("BEAMLET_TEST_RAY_TASK_EVENTS") != "0")
    return options


def close_client(options: dict) -> None:
    client = options.get("client")
    if client is not None:
        client.close()


@pytest.fixture
def backend(backend_name) -> BackendInfo:
    """A started backend (``num_cpus=2``), shut down after the test whatever happens."""
    options = init_options(backend_name)
    try:
        beamlet.init(backend=backend_name, **options)
    except BaseException:
        close_client(options)
        raise
    try:
        yield BackendInfo.current()
    finally:
        beamlet.shutdown()
        try:
            if backend_name == "dask":
                _dask_cluster.reset(options["client"])
            elif backend_name == "ray":
                _ray_cluster.reset()
        finally:
            close_client(options)


@pytest.fixture
def no_backend(monkeypatch):
    """No backend running before or after the test, and no ``BEAMLET_BACKEND``:
    for tests that call ``beamlet.init`` themselves."""
    monkeypatch.delenv("BEAMLET_BACKEND", raising=False)
    _reset()
    try:
        yield
    finally:
        _reset()


@pytest.fixture
def start_backend(no_backend):
    """For tests that need one particular backend, or special init options:
    ``start_backend("inprocess", resources={...})`` starts it (failing the test
    if it is unavailable); it is shut down after the test."""

    def start(name: str, **options) -> BackendInfo:
        reason = backend_missing(name)
        if reason:
            pytest.fail(reason)
        options.setdefault("num_cpus", NUM_CPUS)
        if name == "ray":  # (its own Ray, with these options: not the shared one)
            _ray_cluster.disconnect()
        beamlet.init(backend=name, **options)
        return BackendInfo.current()

    return start


@pytest.fixture
def inprocess(start_backend) -> BackendInfo:
    """The inprocess backend only."""
    return start_backend("inprocess")


def seed_dir() -> str:
    """The seed programs: ``shared/seed`` beside the repo's checkout."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(os.path.dirname(repo), "shared", "seed")


def seed_program(name: str) -> str:
    """The path of seed program `name` (e.g. ``"nested"``); fails the test, with
    where it looked, when it is missing: the seed programs must run."""
    path = os.path.join(seed_dir(), name + ".py")
    if not os.path.isfile(path):
        pytest.fail(f"seed program {name}.py not found at {path}: the checkout must have "
                    f"shared/seed/ beside it")
    return path


@pytest.fixture
def start():
    """For tests of the local backend: ``start(**init_kwargs)`` -> the LocalBackend
    (num_cpus=2 unless given). After the test it is shut down and checked: no
    process, shared-memory segment or temp dir of it may be left."""
    import gc

    import procs

    beamlet.shutdown()  # whatever an earlier test left running
    state = {}

    def _start(**kwargs):
        kwargs.setdefault("num_cpus", NUM_CPUS)
        beamlet.init(backend="local", **kwargs)
        state["backend"] = _runtime.current().backend
        return state["backend"]

    yield _start
    backend = state.get("backend")
    if backend is None or not beamlet.is_initialized():
        beamlet.shutdown()
        return
    gc.collect()
    footprint = procs.footprint(backend)
    beamlet.shutdown()
    procs.assert_all_gone(footprint)


@pytest.fixture(scope="module")
def redis_server():
    """One private ``redis-server`` (a ``RedisServer``) for the test module, stopped
    and its data removed at the end. Tests give each store a namespace of its
    own instead of flushing. A machine without redis-server fails these tests,
    saying how to install it: they never skip."""
    from beamlet.backends.redis.server import RedisServer
    from beamlet.exceptions import BackendError

    server = RedisServer()
    try:
        server.start()
    except BackendError as err:
        pytest.fail(f"this test needs a real Redis: {err}")
    except ModuleNotFoundError as err:
        pytest.fail(f"this test needs the redis package ({err}): pip install -e '.[test]'")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def no_ray_connection_left_behind(request):
    """After each test: a connection of this process to a Ray that no beamlet
    session and no shared Ray of this module holds is closed, and the test is
    named. Left open, Ray's own client ends this whole process (its task-event
    thread calls exit(1)) about 60 s after that Ray stops, taking the xdist
    worker, and the tests it would still run, with it."""
    yield
    real_ray = sys.modules.get("ray")
    if real_ray is None or beamlet.is_initialized() or _ray_cluster.process is not None:
        return
    if real_ray.is_initialized():
        real_ray.shutdown()
        import warnings
        warnings.warn(pytest.PytestWarning(
            f"{request.node.nodeid} left this process connected to a Ray outside any "
            f"beamlet session; disconnected"))
