"""Plugins: a third-party backend found through its entry point, and the other hooks.

The backend is a real package laid out in a temp dir the way pip would install
it: ``beamlet_threads.py`` (copied from ``tests/data/``) plus a hand-written
``beamlet_threads-0.1.dist-info/`` whose ``entry_points.txt`` declares it in
the ``beamlet`` group. Programs run in subprocesses with that dir on
``PYTHONPATH``, so pluggy finds it through importlib.metadata, with no mock.
The other hooks (observers, CLI commands, serializers) are registered at run
time with ``beamlet.core.plugins.register``, as a plugin loaded by entry point
would be.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import beamlet
from beamlet.core import plugins
from beamlet.core.plugins import hookimpl
from conftest import BackendInfo, own_init_options, seed_program

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PLUGIN_SOURCE = HERE / "data" / "beamlet_threads.py"
SUBPROCESS_TIMEOUT = 90  # below pytest-timeout's 120 s, so a hang fails with output




@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory) -> Path:
    """A directory holding the installed plugin package ``beamlet-threads``."""
    root = tmp_path_factory.mktemp("site")
    shutil.copy(PLUGIN_SOURCE, root / "beamlet_threads.py")
    info = root / "beamlet_threads-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\n"
        "Name: beamlet-threads\n"
        "Version: 0.1\n"
        "Summary: A beamlet backend that runs tasks on a thread pool\n"
        "Requires-Dist: beamlet\n")
    (info / "entry_points.txt").write_text("[beamlet]\nthreads = beamlet_threads\n")
    (info / "top_level.txt").write_text("beamlet_threads\n")
    (info / "RECORD").write_text("")
    return root


def run_python(args: list[str], plugin_dir: Path, cwd: Path, backend: str | None = "threads"):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(plugin_dir)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.pop("BEAMLET_BACKEND", None)
    if backend is not None:
        env["BEAMLET_BACKEND"] = backend
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=SUBPROCESS_TIMEOUT)


def run_script(source: str, plugin_dir: Path, tmp_path: Path, backend: str | None = "threads"):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(source))
    return run_python([str(script)], plugin_dir, tmp_path, backend)


def _explain(proc) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


# -- the entry-point backend -------------------------------------------------------

def test_entry_point_plugin_is_discovered(plugin_dir, tmp_path):
    proc = run_script("""
        import importlib.metadata as md
        from beamlet.core import plugins
        eps = {ep.name: ep.value for ep in md.entry_points(group="beamlet")}
        assert eps.get("threads") == "beamlet_threads", eps
        factories = plugins.backend_factories()
        assert {"threads", "inprocess", "local"} <= set(factories), sorted(factories)
        print("discovered", sorted(factories))
    """, plugin_dir, tmp_path)
    assert proc.returncode == 0, _explain(proc)
    assert "discovered" in proc.stdout


def test_cli_lists_entry_point_backend_with_its_flags(plugin_dir, tmp_path):
    proc = run_python(["-m", "beamlet.cli", "backends"], plugin_dir, tmp_path)
    assert proc.returncode == 0, _explain(proc)
    lines = {line.split()[0].rstrip("*"): line.split()
             for line in proc.stdout.splitlines() if line.strip()}
    assert "threads" in lines, proc.stdout
    # NAME PARALLEL ISOLATED ZERO_COPY MULTI_NODE PROVIDED-BY, read off the class unstarted
    assert lines["threads"][1:5] == ["yes", "no", "no", "no"], proc.stdout
    assert lines["threads"][0] == "threads*", proc.stdout  # BEAMLET_BACKEND=threads: default


SEED_PROGRAMS = ["dynamic_graph", "nested", "parameter_server", "simulator"]


@pytest.mark.parametrize("program", SEED_PROGRAMS)
def test_seed_program_runs_unchanged_on_plugin_backend(program, plugin_dir, tmp_path):
    proc = run_python([seed_program(program)], plugin_dir, tmp_path)
    assert proc.returncode == 0, _explain(proc)
    assert f"{program} ok" in proc.stdout, _explain(proc)


def test_plugin_backend_is_parallel_and_keeps_ray_semantics(plugin_dir, tmp_path):
    proc = run_script("""
        import time
        import beamlet as ray
        from beamlet.exceptions import ActorDiedError

        info = ray.init(num_cpus=4)
        assert info["backend"] == "threads", info
        assert ray.get_runtime_context().backend == "threads"

        @ray.remote
        def nap(t):
            time.sleep(t)
            return threading_ident()

        def threading_ident():
            import threading
            return threading.get_ident()

        t0 = time.perf_counter()
        idents = ray.get([nap.remote(0.4) for _ in range(4)])
        elapsed = time.perf_counter() - t0
        assert elapsed < 1.2, f"4 x 0.4 s naps on 4 CPUs took {elapsed:.2f} s: not parallel"
        assert len(set(idents)) == 4, idents

        # Resources bound parallelism: num_cpus=2 each -> two at a time.
        t0 = time.perf_counter()
        ray.get([nap.options(num_cpus=2).remote(0.3) for _ in range(4)])
        elapsed = time.perf_counter() - t0
        assert 0.55 < elapsed < 1.5, f"expected two waves of 0.3 s, took {elapsed:.2f} s"

        # Tasks blocked in get lend their CPU: a tree 3 deep on 4 CPUs.
        @ray.remote
        def tree(depth):
            if depth == 0:
                return 1
            return sum(ray.get([tree.remote(depth - 1) for _ in range(3)]))

        assert ray.get(tree.remote(3), timeout=60) == 27

        # Actor calls run one at a time, in submission order.
        @ray.remote
        class Log:
            def __init__(self):
                self.items = []
                self.running = 0
                self.overlap = False

            def add(self, i):
                self.running += 1
                if self.running > 1:
                    self.overlap = True
                time.sleep(0.001)
                self.items.append(i)
                self.running -= 1

            def read(self):
                return self.items, self.overlap

        log = Log.remote()
        for i in range(100):
            log.add.remote(i)
        items, overlap = ray.get(log.read.remote())
        assert items == list(range(100)) and not overlap, (items, overlap)

        # A temporary handle: the pending call still runs.
        assert ray.get(Log.remote().read.remote()) == ([], False)

        # Errors: a task's exception, a failed dependency, a killed actor.
        @ray.remote
        def boom():
            raise ValueError("boom")

        @ray.remote
        def plus_one(x):
            return x + 1

        try:
            ray.get(plus_one.remote(boom.remote()))
        except ValueError as err:
            assert "boom" in str(err)
        else:
            raise AssertionError("no error")
        ray.kill(log)
        try:
            ray.get(log.read.remote(), timeout=10)
        except ActorDiedError as err:
            assert "kill" in str(err)
        else:
            raise AssertionError("a killed actor answered")

        ready, not_ready = ray.wait([nap.remote(0), nap.remote(5)], num_returns=1, timeout=10)
        assert len(ready) == 1 and len(not_ready) == 1
        ray.shutdown()
        print("threads ok")
    """, plugin_dir, tmp_path)
    assert proc.returncode == 0, _explain(proc)
    assert "threads ok" in proc.stdout, _explain(proc)


def test_unknown_backend_error_lists_installed_backends(plugin_dir, tmp_path):
    proc = run_script("""
        import beamlet
        try:
            beamlet.init(backend="nope")
        except ValueError as err:
            print("ERROR:", err)
        else:
            raise SystemExit("init(backend='nope') did not raise")
    """, plugin_dir, tmp_path, backend=None)
    assert proc.returncode == 0, _explain(proc)
    message = proc.stdout
    for name in ("'nope'", "threads", "inprocess", "local"):
        assert name in message, message


def test_unknown_backend_error_in_process():
    beamlet.shutdown()
    with pytest.raises(ValueError) as info:
        beamlet.init(backend="nope")
    assert "nope" in str(info.value)
    assert "inprocess" in str(info.value) and "local" in str(info.value)
    assert not beamlet.is_initialized()


# -- hooks registered at run time ----------------------------------------------------

@pytest.fixture
def inprocess():
    beamlet.shutdown()
    beamlet.init(backend="inprocess")
    yield
    beamlet.shutdown()


class TaskRecorder:
    """An observer plugin: records lifecycle events."""

    def __init__(self):
        self.lock = threading.Lock()
        self.submitted: list[str] = []
        self.finished: list[tuple[str, str]] = []

    @hookimpl
    def beamlet_task_submitted(self, spec):
        with self.lock:
            self.submitted.append(spec.display_name)

    @hookimpl
    def beamlet_task_finished(self, spec, status, duration):
        assert duration >= 0
        with self.lock:
            self.finished.append((spec.display_name, status))


def test_runtime_observer_plugin_sees_task_events(backend_name):
    """Every backend reports each attempt's outcome: FINISHED, FAILED for a task
    that raised, RETRYING before a retry, CANCELLED for a cancelled task."""
    @beamlet.remote
    def square(x):
        return x * x

    @beamlet.remote
    def fail():
        raise KeyError("no")

    @beamlet.remote(max_retries=1, retry_exceptions=True)
    def flaky():
        raise ValueError("again")

    @beamlet.remote
    def sleeper():
        import time
        time.sleep(60)

    recorder = TaskRecorder()
    plugins.register(recorder)
    try:
        beamlet.init(backend=backend_name, **own_init_options(backend_name))
        info = BackendInfo.current()
        assert beamlet.get(square.remote(3), timeout=30) == 9
        with pytest.raises(KeyError):
            beamlet.get(fail.remote(), timeout=30)
        with pytest.raises(ValueError):
            beamlet.get(flaky.remote(), timeout=30)
        if info.parallel:  # (elsewhere a task has finished before its ref exists)
            ref = sleeper.remote()
            time.sleep(0.5)
            beamlet.cancel(ref)
            with pytest.raises(beamlet.exceptions.TaskCancelledError):
                beamlet.get(ref, timeout=30)
    finally:
        beamlet.shutdown()
        plugins.unregister(recorder)
    names = [n.rsplit(".", 1)[-1] for n in recorder.submitted]
    expected_names = ["square", "fail", "flaky"] + (["sleeper"] if info.parallel else [])
    assert names == expected_names, recorder.submitted
    statuses = [(n.rsplit(".", 1)[-1], s) for n, s in recorder.finished]
    expected = [("square", "FINISHED"), ("fail", "FAILED"), ("flaky", "RETRYING"),
                ("flaky", "FAILED")] + ([("sleeper", "CANCELLED")] if info.parallel else [])
    assert statuses == expected, recorder.finished

    # Unregistered: no more events.
    beamlet.init(backend=backend_name, **own_init_options(backend_name))
    try:
        beamlet.get(square.remote(4), timeout=30)
    finally:
        beamlet.shutdown()
    assert len(recorder.submitted) == len(expected_names)


class SlowRecorder:
    """An observer whose hook takes a while: a backend whose observers hear
    attempts' ends on a thread of their own (``dask``) is still telling it
    when ``get`` returns."""

    DELAY = 0.25  # seconds each end takes to be told

    def __init__(self):
        self.lock = threading.Lock()
        self.finished: list[tuple[str, str]] = []

    @hookimpl
    def beamlet_task_finished(self, spec, status):
        time.sleep(self.DELAY)
        with self.lock:
            self.finished.append((spec.display_name.rsplit(".", 1)[-1], status))


@pytest.fixture
def slow_recorder():
    """A `SlowRecorder`, registered while the test runs. (Asked for before
    ``backend`` or ``init``: the driver's observers are known at ``init``.)"""
    recorder = SlowRecorder()
    plugins.register(recorder)
    try:
        yield recorder
    finally:
        plugins.unregister(recorder)


def test_shutdown_returns_once_observers_heard_the_ends_of_results_read(slow_recorder,
                                                                        backend):
    """Every task whose result the driver has read has been told to the
    observers (its end) when ``shutdown`` returns, however slow they are.
    (test_dask_backend.py: on dask, a cancel after those reads is told after them.)"""
    @beamlet.remote
    def square(x):
        return x * x

    n = 6
    assert beamlet.get([square.remote(i) for i in range(n)], timeout=60) == \
        [i * i for i in range(n)]
    beamlet.shutdown()
    with slow_recorder.lock:
        assert slow_recorder.finished == [("square", "FINISHED")] * n


class GreetCommand:
    """A plugin adding ``beamlet greet --name NAME``."""

    def __init__(self):
        self.calls = []

    @hookimpl
    def beamlet_cli_commands(self, subparsers):
        parser = subparsers.add_parser("greet", help="say hello (a plugin's command)")
        parser.add_argument("--name", default="world")
        parser.set_defaults(func=self.run)

    def run(self, args) -> int:
        self.calls.append(args.name)
        print(f"hello, {args.name}")
        return 7


def test_cli_command_from_plugin_runs(capsys):
    from beamlet import cli
    command = GreetCommand()
    plugins.register(command)
    try:
        assert cli.main(["greet", "--name", "beamlet"]) == 7
        assert command.calls == ["beamlet"]
        assert "hello, beamlet" in capsys.readouterr().out
        with pytest.raises(SystemExit):
            cli.main(["--help"])
        assert "greet" in capsys.readouterr().out
    finally:
        plugins.unregister(command)
    with pytest.raises(SystemExit):  # gone with its plugin
        cli.main(["greet"])


class Sealed:
    """Holds a lock, so plain pickling fails; a plugin's serializer rebuilds it."""

    def __init__(self, value):
        self.value = value
        self.lock = threading.Lock()


def _reduce_sealed(obj):
    return (Sealed, (obj.value,))


class SealedSerializer:
    @hookimpl
    def beamlet_serializers(self):
        return [(Sealed, _reduce_sealed)]


def test_serializer_from_plugin_is_used(inprocess):
    with pytest.raises(TypeError, match="Sealed"):
        beamlet.put(Sealed(1))

    serializer = SealedSerializer()
    plugins.register(serializer)
    try:
        ref = beamlet.put(Sealed(41))
        back = beamlet.get(ref)
        assert isinstance(back, Sealed) and back.value == 41
        assert back.lock is not None and back.lock.acquire(blocking=False)

        @beamlet.remote
        def bump(sealed):
            return Sealed(sealed.value + 1)

        out = beamlet.get(bump.remote(Sealed(1)))
        assert isinstance(out, Sealed) and out.value == 2
    finally:
        plugins.unregister(serializer)


class _RecordingControlStorePlugin:
    """A control store plugin for the 'rec://' scheme: a MemoryControlStore that
    remembers the URL it was opened with and what was written to it."""

    def __init__(self):
        self.opened: list[str] = []
        self.stores: list = []

    @hookimpl
    def beamlet_control_stores(self):
        from beamlet.core.control_store import MemoryControlStore

        def factory(url):
            self.opened.append(url)
            store = MemoryControlStore()
            self.stores.append(store)
            return store

        return {"rec": factory}


@pytest.mark.parametrize("backend_name", ["inprocess", "local"])
def test_control_store_from_plugin_is_used(backend_name):
    plugin = _RecordingControlStorePlugin()
    beamlet.shutdown()
    plugins.register(plugin)
    try:
        beamlet.init(backend=backend_name, **own_init_options(backend_name),
                     control_store="rec://somewhere:1")

        @beamlet.remote
        class Named:
            def ping(self):
                return "pong"

        actor = Named.options(name="registered-in-plugin-store").remote()
        assert beamlet.get(actor.ping.remote(), timeout=30) == "pong"
        assert plugin.opened == ["rec://somewhere:1"]
        [store] = plugin.stores
        # The named actor and the actor's code went to the plugin's store.
        assert any(b"registered-in-plugin-store" in k for k in store.keys("named_actors"))
        assert store.keys("functions")
    finally:
        beamlet.shutdown()
        plugins.unregister(plugin)


class _Listening:
    def hear(self, **kwargs):
        raise AssertionError("removed, so never called")


def test_listeners_hear_observer_hooks_before_plugins_and_may_fail(capsys):
    """plugins.add_listener: beamlet's own observers, called by notify without
    pluggy; one that raises is reported and the others still hear the event."""
    heard = []

    def broken(**kwargs):
        raise RuntimeError("listener broke")

    def listener(spec, status, duration, pid):
        heard.append((spec, status, pid))

    with pytest.raises(AttributeError):
        plugins.add_listener("beamlet_no_such_hook", listener)
    plugins.add_listener("beamlet_task_finished", broken)
    plugins.add_listener("beamlet_task_finished", listener)
    bound = _Listening()
    plugins.add_listener("beamlet_task_finished", bound.hear)
    plugins.remove_listener("beamlet_task_finished", bound.hear)  # (a new bound method object)
    try:
        plugins.notify("beamlet_task_finished", spec="s", status="FINISHED", duration=0.1, pid=7)
    finally:
        plugins.remove_listener("beamlet_task_finished", broken)
        plugins.remove_listener("beamlet_task_finished", listener)
    plugins.notify("beamlet_task_finished", spec="t", status="FAILED", duration=0.1, pid=8)
    assert heard == [("s", "FINISHED", 7)]
    assert "listener broke" in capsys.readouterr().err


# An observer plugin that raises does not lose the task's result.
@beamlet.remote
def answer():
    return 42


def test_raising_task_finished_observer_does_not_lose_results(start):
    from beamlet.core import plugins

    class BrokenMetrics:
        @plugins.hookimpl
        def beamlet_task_finished(self, spec, status, duration):
            raise RuntimeError("metrics backend unreachable")

    plugin = BrokenMetrics()
    start()
    plugins.register(plugin)
    try:
        assert beamlet.get(answer.remote(), timeout=15) == 42
    finally:
        plugins.unregister(plugin)
