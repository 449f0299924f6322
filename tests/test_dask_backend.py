"""What only the ``dask`` backend does: its own LocalCluster (its scheduler in
the driver, its workers processes the driver starts and restarts, closed to
clients without the session's key, gone after `shutdown`, also when the
driver dies, and started from an unguarded script), joining a scheduler by address, and bad addresses. The semantic
suite (test_api.py, test_ray_compat.py) and the seed programs run on ``dask``
too, through ``BACKENDS`` in conftest.py; the control store's contract runs on
it in test_control_store.py."""
from __future__ import annotations

import asyncio
import os
import socket
import time

import pytest

import procs
from test_plugins import SlowRecorder

import beamlet as ray
from beamlet import exceptions as exc
from beamlet.core import plugins
from beamlet.core import runtime as _runtime

GONE_TIMEOUT = 30
LONG = 60  # seconds: an upper bound for waits that should end at once


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_init_starts_a_cluster_with_the_requested_resources_and_shutdown_ends_it(no_backend):
    before = set(procs.children_of(os.getpid()))
    ray.init(backend="dask", num_cpus=2, resources={"disk": 2})
    backend = _runtime.current().backend
    worker_pids = list(backend.client.run(os.getpid).values())
    assert len(worker_pids) == 2 and os.getpid() not in worker_pids
    assert sorted(worker_pids) == sorted(backend._cluster.worker_pids())
    # The scheduler is in the driver (no process of its own): the driver's
    # new children are the workers alone.
    assert set(procs.children_of(os.getpid())) - before == set(worker_pids)
    # The workers' scratch space is the cluster's own (not a shared /tmp/dask-scratch-space).
    scratch = list(backend.client.run(lambda dask_worker: dask_worker.local_directory).values())
    assert scratch and all(os.path.basename(_scratch_of(d)).startswith("beamlet-") and
                           os.path.isdir(d) for d in scratch), scratch
    # So is the scheduler's (it runs in the driver), which the workers' path leaves out.
    scheduler_dir = backend._cluster.local_directory
    assert _scratch_of(scheduler_dir) == _scratch_of(scratch[0])
    assert scheduler_dir not in backend.job["sys_path"]
    scratch.append(scheduler_dir)
    assert ray.cluster_resources()["CPU"] == 2.0
    assert ray.cluster_resources()["disk"] == 2.0

    @ray.remote(resources={"disk": 1})
    def where():
        return os.getpid()

    assert ray.get(where.remote(), timeout=60) in worker_pids
    with pytest.raises(ValueError, match="disk"):
        where.options(resources={"disk": 2}).remote()  # no single worker has 2
    with pytest.raises(ValueError, match="tape"):
        where.options(resources={"tape": 1}).remote()
    ray.shutdown()
    assert procs.wait_gone(worker_pids, GONE_TIMEOUT) == []
    assert [d for d in scratch if os.path.exists(d)] == []


def _scratch_of(worker_dir: str) -> str:
    """The cluster's scratch dir that holds a worker's local directory."""
    while not os.path.basename(worker_dir).startswith("beamlet-"):
        parent = os.path.dirname(worker_dir)
        assert parent != worker_dir, f"no beamlet- scratch dir above {worker_dir}"
        worker_dir = parent
    return worker_dir


def _listening(pids) -> list[tuple[str, int, int]]:
    """(local address, port, pid) of each TCP socket the processes listen on,
    read from /proc (IPv4 and IPv6)."""
    import ipaddress
    found = []
    for pid in pids:
        inodes = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        for table in ("tcp", "tcp6"):
            with open(f"/proc/{pid}/net/{table}") as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[3] != "0A" or fields[9] not in inodes:  # (0A: LISTEN)
                        continue
                    host, port = fields[1].split(":")
                    raw = bytes.fromhex(host)
                    # (/proc prints each 32-bit word in host order: little-endian here)
                    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                    found.append((str(ipaddress.ip_address(raw)), int(port, 16), pid))
    return found


@pytest.mark.parametrize("dashboard", [False, True])
def test_the_cluster_listens_on_loopback_only(no_backend, dashboard):
    """Every socket of the cluster beamlet starts (scheduler, its HTTP server
    with or without the dashboard, workers) listens on 127.0.0.1:
    Dask's own ":0" for a dashboard would be every interface. Without the
    dashboard, the HTTP server serves none of Dask's pages (which need no key
    and show the cluster's logs and the stacks of its running tasks), and the
    workers do not profile their threads for it."""
    import urllib.error
    import urllib.parse
    import urllib.request
    # (What this process listened on before, e.g. for another backend an
    # earlier test in it started, is not the cluster's.)
    before = set(_listening([os.getpid()]))
    ray.init(backend="dask", num_cpus=1, dashboard=dashboard)
    backend = _runtime.current().backend
    tree = [os.getpid(), *backend._cluster.worker_pids()]
    info = backend.client.scheduler_info()
    http = info["services"].get("dashboard")
    sockets = [s for s in _listening(tree) if s not in before]
    [worker] = info["workers"]
    # (Its workers sample their threads for the dashboard's profile page only
    # when there is a dashboard: some 2.5% of a core each, idle or not.)
    profiling = backend.client.run(lambda dask_worker: "profile" in dask_worker.periodic_callbacks)
    served = {}
    for page in ("/json/identity.json", "/info/main/logs.html",
                 f"/info/call-stacks/{urllib.parse.quote(worker, safe='')}.html"):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http}{page}", timeout=LONG) as r:
                served[page] = r.status
        except urllib.error.HTTPError as err:
            served[page] = err.code
    ray.shutdown()
    assert served == {page: 200 if dashboard else 404 for page in served}, served
    assert profiling == {worker: dashboard}, profiling
    assert http is not None and http != 8787  # (its HTTP server, on a free port)
    assert any(port == http for _host, port, _pid in sockets), (http, sockets)
    assert len(sockets) >= 3, sockets  # scheduler, HTTP, worker at least
    assert [s for s in sockets if s[0] != "127.0.0.1"] == []


_KILLED_DRIVER = """
import sys
import beamlet as ray
from beamlet.core import runtime
ray.init(backend="dask", num_cpus=2)

@ray.remote
def one():
    return 1

assert ray.get(one.remote(), timeout=60) == 1
cluster = runtime.current().backend._cluster
print("CLUSTER", cluster._session.path, *cluster.worker_pids(), flush=True)
sys.stdin.read()
"""


def test_a_killed_drivers_workers_end_and_its_scratch_dir_is_swept(no_backend, tmp_path):
    """A driver killed with no chance to clean up (as when CI's timeout kills
    it): its workers end by themselves (their standard input closes), and the
    next start sweeps the scratch dir, whose lock they held with it. The
    driver's main module is unguarded, as a seed program's."""
    import signal
    driver = procs.Driver(_KILLED_DRIVER, tmp_path, stdin=None)
    try:
        lock, *workers = driver.wait_line("CLUSTER ", LONG).split()
        workers = [int(w) for w in workers]
        assert len(workers) == 2
        with open(lock) as f:
            scratch = f.read()
        assert os.path.isdir(scratch)
        os.kill(driver.pid, signal.SIGKILL)
        assert procs.wait_gone(workers, GONE_TIMEOUT) == []
    finally:
        driver.kill()
    # (Any start sweeps it, a local-backend one of another program too: the next
    # one here, at the latest. A start beside this test may be sweeping it right
    # now, holding its lock: this one then leaves it to that one, which is done
    # within moments.)
    ray.init(backend="dask", num_cpus=1)
    assert procs.wait_until(lambda: not os.path.exists(scratch) and not os.path.exists(lock),
                            GONE_TIMEOUT), (scratch, lock)
    ray.shutdown()


_WORKER_MODULES = """
import sys
import beamlet as ray
ray.init(backend="dask", num_cpus=1)

@ray.remote
def modules():
    return sorted(m for m in sys.modules if m.startswith("beamlet"))

print("MODULES", *ray.get(modules.remote(), timeout=60), flush=True)
ray.shutdown()
"""


def test_a_worker_imports_only_what_running_tasks_needs(no_backend, tmp_path):
    """A Dask worker imports beamlet's runtime for the tasks it runs, not the
    driver's API (``import beamlet`` loads its names on first use): each
    worker process of a cluster pays that import at its start. The task's
    function comes from the unguarded main script, so it is pickled by value
    and names no module of the test's."""
    driver = procs.Driver(_WORKER_MODULES, tmp_path)
    try:
        loaded = set(driver.wait_line("MODULES ", LONG).split())
        assert driver.proc.wait(LONG) == 0, driver.stderr
    finally:
        driver.kill()
    assert {"beamlet.core.runtime", "beamlet.backends.dask.worker"} <= loaded, loaded
    assert loaded.isdisjoint({"beamlet.core.api", "beamlet.core.actor", "beamlet.util",
                              "beamlet.core.memory_store",
                              "beamlet.core.remote_function", "beamlet.job_config"}), loaded


def test_a_worker_that_dies_is_started_again(no_backend):
    """The driver does the nanny's part: a worker process that dies is
    replaced, and Dask runs the tasks it held elsewhere."""
    import signal
    ray.init(backend="dask", num_cpus=1)
    backend = _runtime.current().backend
    [first] = backend._cluster.worker_pids()

    @ray.remote
    def pid():
        return os.getpid()

    assert ray.get(pid.remote(), timeout=LONG) == first
    os.kill(first, signal.SIGKILL)
    assert procs.wait_gone([first], GONE_TIMEOUT) == []
    assert procs.wait_until(lambda: backend._cluster.worker_pids() != [first], LONG)
    [second] = backend._cluster.worker_pids()
    assert ray.get(pid.remote(), timeout=LONG) == second
    ray.shutdown()
    assert procs.wait_gone([second], GONE_TIMEOUT) == []


def test_a_cluster_with_a_spare_replaces_a_restarted_worker_with_it(no_backend):
    """``Cluster(spare=True)`` keeps one more worker process started: a worker
    that is restarted is replaced by that process (no new process's imports to
    wait for), a new spare is started, and `stop` ends them all."""
    from distributed import Client

    from beamlet.backends.dask.cluster import Cluster
    cluster = Cluster(2, {}, spare=True)
    seen = []
    try:
        spare = cluster._spare.pid
        first = cluster.worker_pids()
        seen = first + [spare]
        with Client(cluster.address, security=cluster.security, timeout=LONG) as client:
            address = next(a for a, pid in client.run(os.getpid).items() if pid == first[0])
            cluster.restart_workers([address], timeout=LONG)
            pids = cluster.worker_pids()
            assert spare in pids and first[0] not in pids and first[1] in pids
            assert procs.wait_until(lambda: cluster._spare is not None
                                    and cluster._spare.pid not in seen, LONG)
            seen.append(cluster._spare.pid)
            assert sorted(client.run(os.getpid).values()) == sorted(pids)
    finally:
        cluster.stop()
    assert procs.wait_gone(seen, GONE_TIMEOUT) == []


def test_a_worker_restarted_as_the_cluster_stops_ends_quietly(no_backend, monkeypatch):
    """The driver's nanny thread starts a dead worker again and sends it its
    spec while `stop` cannot close that worker's standard input: the thread
    ends without an error, and so does the new worker. (The delay before the
    spec is sent stands in for the thread being descheduled on a loaded box.)"""
    import signal
    import threading

    from beamlet.backends.dask import cluster as dask_cluster
    errors = []
    monkeypatch.setattr(threading, "excepthook",
                        lambda args: errors.append(f"{args.thread.name}: {args.exc_value!r}"))
    send = dask_cluster.Cluster._send_spec

    def late_send(self, index, proc):
        if self._ready:  # (a restart)
            time.sleep(1.0)
        send(self, index, proc)
    monkeypatch.setattr(dask_cluster.Cluster, "_send_spec", late_send)
    cluster = dask_cluster.Cluster(1, {})
    try:
        [first] = cluster.worker_pids()
        os.kill(first, signal.SIGKILL)
        assert procs.wait_until(lambda: cluster.worker_pids() != [first], LONG)
        [second] = cluster.worker_pids()
    finally:
        cluster.stop()
    for watcher in cluster._watchers:
        watcher.join(LONG)
        assert not watcher.is_alive()
    assert errors == []
    assert procs.wait_gone([first, second], GONE_TIMEOUT) == []


def test_restart_workers_reads_the_schedulers_workers_on_its_loop(no_backend):
    """The scheduler's workers change on its event loop (a worker joins or
    leaves): `restart_workers`, called from another thread, reads them there."""
    import threading

    from beamlet.backends.dask.cluster import Cluster
    from distributed.utils import sync
    cluster = Cluster(1, {})
    try:
        scheduler = cluster._scheduler
        readers = set()

        class Watched(type(scheduler.workers)):  # (records the threads that iterate it)
            def __iter__(self):
                readers.add(threading.get_ident())
                return super().__iter__()

            def items(self):
                readers.add(threading.get_ident())
                return super().items()

        async def watch():
            addresses = list(scheduler.workers)
            scheduler.workers = Watched(scheduler.workers)
            return threading.get_ident(), addresses
        loop_thread, addresses = sync(cluster.loop, watch)
        [first] = cluster.worker_pids()
        cluster.restart_workers(addresses, timeout=LONG)
        assert cluster.worker_pids() != [first]
        assert readers == {loop_thread}
    finally:
        cluster.stop()


def test_a_client_without_the_session_key_is_refused(no_backend):
    from distributed import Client

    from beamlet.backends.dask.comm import KeyedSecurity, new_key
    ray.init(backend="dask", num_cpus=1)
    address = _runtime.current().backend._cluster.address
    assert address.startswith("beamlet://127.0.0.1:")
    with pytest.raises((OSError, TimeoutError)):  # a key of its own: the proof fails
        Client(address, security=KeyedSecurity(new_key()), timeout=5)
    with pytest.raises((OSError, TimeoutError)):  # (the client's end refuses to try)
        Client(address, timeout=5)
    # A stranger speaking first (as Dask's plain tcp:// or tls:// client would)
    # gets nothing back but the scheduler's nonce, and is cut off.
    host, port = address.split("://", 1)[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(os.urandom(64))
        received = b""
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            received += chunk
        assert len(received) == 32, received
    assert ray.get(ray.put("still serving"), timeout=30) == "still serving"


def test_a_proof_relayed_from_another_port_is_refused(no_backend):
    """A stranger listening elsewhere (say on a dead worker's freed port) that
    forwards every byte between an honest client and the scheduler cannot get
    the proofs accepted: they name the listener dialled."""
    import threading

    from distributed import Client

    ray.init(backend="dask", num_cpus=1)
    cluster = _runtime.current().backend._cluster
    host, port = cluster.address.split("://", 1)[1].rsplit(":", 1)
    relay = socket.create_server(("127.0.0.1", 0))
    relay.settimeout(60)
    relayed = []

    def pump(source, sink):
        try:
            while chunk := source.recv(65536):
                relayed.append(len(chunk))
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    opened = []

    def serve():  # (every connection the client opens, each relayed both ways)
        while True:
            try:
                honest, _ = relay.accept()
            except OSError:
                return  # (closed by the test)
            upstream = socket.create_connection((host, int(port)), timeout=30)
            upstream.settimeout(None)
            honest.settimeout(None)
            opened.extend((honest, upstream))
            for pair in ((honest, upstream), (upstream, honest)):
                threading.Thread(target=pump, args=pair, daemon=True).start()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        relayed_address = f"beamlet://127.0.0.1:{relay.getsockname()[1]}"
        with pytest.raises((OSError, TimeoutError)):
            Client(relayed_address, security=cluster.security, timeout=10)
        assert relayed, "the relay carried nothing: the test did not reach the proof"
    finally:
        try:  # (wakes the accept() above: close() alone does not, on Linux)
            relay.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        relay.close()
        server.join(30)
        assert not server.is_alive(), "the relay's accept loop did not end"
        for end in opened:
            end.close()
    # The same key at the scheduler's own address is accepted.
    client = Client(cluster.address, security=cluster.security, timeout=30)
    assert client.submit(sum, [1, 2], pure=False).result(timeout=30) == 3
    client.close()


def test_joins_a_scheduler_by_address_and_leaves_it_running(no_backend):
    from beamlet.backends.dask.cluster import Cluster
    from distributed import Client
    cluster = Cluster(1, {})
    try:
        client = Client(cluster.address, security=cluster.security, timeout=30)
        ray.init(backend="dask", client=client)

        @ray.remote
        def double(x):
            return 2 * x

        assert ray.get(double.remote(21), timeout=60) == 42
        ray.shutdown()
        assert client.status == "running"  # the user's client stays theirs
        assert client.submit(sum, [1, 2], pure=False).result(timeout=30) == 3
        client.close()
    finally:
        cluster.stop()


def _scatters_through_scheduler(client) -> int:
    """How many scatters of `client` went through the scheduler (Dask logs an
    event for each; a direct one, client to worker, logs none)."""
    return sum(1 for _time, msg in client.get_events("all")
               if msg.get("action") == "scatter" and msg.get("client") == client.id)


def test_large_puts_go_direct_to_workers_only_if_the_client_may(no_backend):
    """A user's client made with ``direct_to_workers=False`` (its workers may be
    unreachable from the driver) has even a large put relayed by the scheduler;
    in the cluster beamlet starts itself, a large put goes straight to a worker."""
    from beamlet.backends.dask.cluster import Cluster
    from distributed import Client
    large = b"x" * (2 * 1024 * 1024)
    cluster = Cluster(1, {})
    try:
        client = Client(cluster.address, security=cluster.security, timeout=30,
                        direct_to_workers=False)
        ray.init(backend="dask", client=client)
        assert ray.get(ray.put(large), timeout=LONG) == large
        assert _scatters_through_scheduler(client) == 1
        ray.shutdown()
        client.close()
    finally:
        cluster.stop()
    ray.init(backend="dask", num_cpus=1)
    own = _runtime.current().backend.client
    assert ray.get(ray.put(large), timeout=LONG) == large

    @ray.remote
    def echo(value):
        return value

    assert ray.get(echo.remote(ray.put(b"small")), timeout=LONG) == b"small"
    assert _scatters_through_scheduler(own) == 1  # (the small one)
    ray.shutdown()


def test_the_drivers_small_puts_are_scattered_together_once_their_refs_leave(no_backend):
    """The driver keeps its small puts (read there without asking Dask) until
    something it sends Dask could carry their refs elsewhere: then they go in
    one scatter, not one each, before it."""
    ray.init(backend="dask", num_cpus=1)
    client = _runtime.current().backend.client
    values = [{"n": i} for i in range(500)]
    refs = [ray.put(v) for v in values]
    values[7]["n"] = -1  # (a put is the value as it was)
    assert ray.get(refs[7], timeout=0) == {"n": 7}
    assert ray.wait(refs, num_returns=len(refs), timeout=0)[1] == []
    assert _scatters_through_scheduler(client) == 0
    assert ray.get(echo_all.remote(refs), timeout=LONG) == [{"n": i} for i in range(500)]
    assert _scatters_through_scheduler(client) == 1

    async def in_a_coroutine():  # (on an event loop of the program's own)
        return ray.get(echo_all.remote([ray.put("put in a coroutine")]), timeout=LONG)

    assert asyncio.run(in_a_coroutine()) == ["put in a coroutine"]
    ray.shutdown()


@ray.remote
def echo_all(refs):
    return ray.get(refs)


def test_small_puts_dropped_before_they_were_sent_are_never_sent(no_backend):
    """A small put whose last ref goes before the driver's puts were sent is
    dropped from them (nothing can read it); the rest go in one scatter."""
    ray.init(backend="dask", num_cpus=1)
    client = _runtime.current().backend.client
    refs = [ray.put(i) for i in range(10)]
    del refs[::2]  # 0, 2, 4, 6, 8
    assert ray.get(echo_all.remote(refs), timeout=LONG) == [1, 3, 5, 7, 9]
    counts = [msg["count"] for _time, msg in client.get_events("all")
              if msg.get("action") == "scatter" and msg.get("client") == client.id]
    assert counts == [5]
    ray.shutdown()


def test_a_cancel_is_told_after_the_ends_of_the_results_read_before_it(no_backend):
    """The driver tells a cancelled task's end itself, on the caller's thread;
    the ends its workers reported for the results it read before are told to
    the observers first, however slow they are."""
    recorder = SlowRecorder()
    plugins.register(recorder)
    try:
        _squares_then_a_cancel()
    finally:
        plugins.unregister(recorder)
    with recorder.lock:
        assert recorder.finished == [("square", "FINISHED")] * 6 + [("sleeper", "CANCELLED")]


def _squares_then_a_cancel() -> None:
    ray.init(backend="dask", num_cpus=2)

    @ray.remote
    def square(x):
        return x * x

    @ray.remote
    def sleeper():
        time.sleep(60)

    assert ray.get([square.remote(i) for i in range(6)], timeout=LONG) == \
        [i * i for i in range(6)]
    ref = sleeper.remote()
    ray.cancel(ref)
    with pytest.raises(exc.TaskCancelledError):
        ray.get(ref, timeout=LONG)
    ray.shutdown()


def test_an_error_ref_dropped_on_the_schedulers_thread_does_not_stop_it(no_backend):
    """A cluster started in this process runs its scheduler on an event loop
    thread here, where a garbage collection may drop a ref's last holder. The
    release must not fetch the (unread error's) value there: the scheduler
    would stop answering, its own fetch with it, until the fetch timed out."""
    import threading

    from beamlet.backends.dask.cluster import Cluster
    from distributed import Client
    cluster = Cluster(1, {})
    try:
        client = Client(cluster.address, security=cluster.security, timeout=30)
        ray.init(backend="dask", client=client)

        @ray.remote
        def fail():
            raise ValueError("never read")

        holder = [fail.remote()]
        assert len(ray.wait(holder, timeout=LONG)[0]) == 1
        dropped = threading.Event()

        def drop():  # (on the scheduler's thread, as a collection there would)
            holder.clear()
            dropped.set()
        cluster.loop.add_callback(drop)
        assert dropped.wait(20), "the release blocked the scheduler's event loop"
        assert ray.get(ray.put("still answering"), timeout=LONG) == "still answering"
        ray.shutdown()
        client.close()
    finally:
        cluster.stop()


def test_nothing_listening_at_the_address_is_a_clear_error_within_seconds(no_backend):
    start = time.monotonic()
    with pytest.raises(exc.BackendError, match="no Dask scheduler answered"):
        ray.init(backend="dask", address=f"tcp://127.0.0.1:{_free_port()}")
    assert time.monotonic() - start < 60
    assert not ray.is_initialized()


def test_bad_options_are_named(no_backend):
    with pytest.raises(TypeError, match="distributed.Client"):
        ray.init(backend="dask", client="not a client")
    with pytest.raises(ValueError, match="object_store_memory"):
        ray.init(backend="dask", object_store_memory=10**9)



@ray.remote
class _Echo:
    def echo(self, x):
        return x


@ray.remote(max_concurrency=2)
class _Caller:
    def call_each(self, actors):
        """Each actor's first call from this process (its Dask actor is looked
        up first: a scheduler round trip between the call's ref and its
        submission)."""
        return ray.get([a.echo.remote(i) for i, a in enumerate(actors)], timeout=LONG)

    def ping(self):
        return "pong"


def test_submissions_from_a_worker_race_no_call_ending_there(no_backend):
    # A task or actor call ending in a worker holds the refs its process
    # borrowed; it once also took refs that another thread there had made but
    # not yet submitted, and held them first: Dask then took the submission for
    # a duplicate of a key the process held and dropped it, and the nested get
    # never returned (this test's pytest timeout).
    ray.init(backend="dask", num_cpus=2)
    caller = _Caller.remote()
    actors = [_Echo.remote() for _ in range(12)]
    assert ray.get([a.echo.remote("up") for a in actors] + [caller.ping.remote()],
                   timeout=LONG) == ["up"] * 12 + ["pong"]
    done = caller.call_each.remote(actors)
    while not ray.wait([done], timeout=0)[0]:  # calls ending beside call_each
        assert ray.get(caller.ping.remote(), timeout=LONG) == "pong"
    assert ray.get(done, timeout=LONG) == list(range(12))


def test_shutdown_as_a_fresh_worker_starts_the_job(no_backend):
    # A job's first task in a worker process makes the job's runtime there,
    # which first connects the worker's own Dask client, on the worker's event
    # loop. The shutdown's end_job, which runs on that loop, once waited there
    # for a lock the maker held through it: the worker's loop hung for good,
    # and the next job's calls with it (this get's timeout).
    from beamlet.backends.dask.cluster import Cluster
    from distributed import Client
    for _ in range(3):
        cluster = Cluster(1, {})
        try:
            client = Client(cluster.address, security=cluster.security, timeout=30)
            ray.init(backend="dask", client=client)
            _Echo.remote()  # (its host: the worker's first task)
            ray.shutdown()
            ray.init(backend="dask", client=client)
            assert ray.get(_Echo.remote().echo.remote("next job"), timeout=LONG) == "next job"
            ray.shutdown()
            client.close()
        finally:
            cluster.stop()


@ray.remote
class _Sleeper:
    def sleep(self, seconds):
        time.sleep(seconds)
        return seconds


def test_an_actor_call_longer_than_the_hosts_check_interval(no_backend):
    # The creation ref's task checks, in turns, that the actor's Dask worker
    # still holds it, and a call waits for its answer on its connection to that
    # worker: neither takes a call running many turns for a dead actor.
    def set_poll(seconds):  # (nested: Dask ships it by value)
        from beamlet.backends.dask import worker
        worker._POLL = seconds

    ray.init(backend="dask", num_cpus=1)
    _runtime.current().backend.client.run(set_poll, 0.05)
    sleeper = _Sleeper.remote()
    assert ray.get(sleeper.sleep.remote(1.0), timeout=LONG) == 1.0


@ray.remote(max_concurrency=8)
class _Gate:
    """A call that waits (in the actor) until another call opens the gate."""

    def __init__(self):
        import threading
        self.gate = threading.Event()

    def value_when_open(self, value):
        assert self.gate.wait(LONG), "the gate never opened"
        return value

    def open(self):
        self.gate.set()

    def plus(self, x, y):
        return x + y


@ray.remote
def _plus_one(x):
    return x + 1


@ray.remote
def _first_plus_one(refs):
    return ray.get(refs[0], timeout=LONG) + 1


def test_actor_call_results_leave_the_caller_arrived_or_not(no_backend):
    # A call's result comes back to its caller only; a ref to it that leaves
    # the caller (a task's or call's argument, inside a list, inside a put)
    # is published: scattered once it arrived, else a relay task that the
    # value is handed to when it arrives.
    ray.init(backend="dask", num_cpus=2)
    gate, other = _Gate.remote(), _Gate.remote()
    arrived = gate.plus.remote(1, 2)
    assert ray.get(arrived, timeout=LONG) == 3
    pending = [gate.value_when_open.remote(10 * i) for i in range(1, 5)]
    as_task_arg = _plus_one.remote(pending[0])
    as_call_arg = other.plus.remote(pending[1], arrived)
    nested = _first_plus_one.remote([pending[2]])
    put_holding = ray.put([pending[3]])
    assert not ray.wait(pending, num_returns=1, timeout=0)[0]  # (none arrived yet)
    gate.open.remote()
    assert ray.get([as_task_arg, as_call_arg, nested, _plus_one.remote(arrived)],
                   timeout=LONG) == [11, 23, 31, 4]
    assert ray.get(ray.get(put_holding, timeout=LONG)[0], timeout=LONG) == 40


@ray.remote
class _Counter:
    def __init__(self):
        self.n = 0

    def inc(self):
        self.n += 1
        return self.n


def test_thousands_of_calls_at_once_run_in_order(no_backend):
    # Calls to one actor travel on a few connections (2,000 at once once
    # opened as many, and timed out connecting), still in submission order.
    ray.init(backend="dask", num_cpus=2)
    counter = _Counter.remote()
    assert ray.get([counter.inc.remote() for _ in range(2000)], timeout=300) == \
        list(range(1, 2001))


@ray.remote
class _Barrier:
    """Async: each `arrive` waits until `n` calls arrived."""

    def __init__(self, n):
        import asyncio
        self.n = n
        self.arrived = 0
        self.all_in = asyncio.Event()

    async def arrive(self):
        self.arrived += 1
        if self.arrived == self.n:
            self.all_in.set()
        await self.all_in.wait()
        return self.arrived


def test_calls_blocked_until_later_calls_arrive_do_not_hold_those_back(no_backend):
    # More calls than a process keeps in flight to one actor (8) each wait
    # in the actor for the later ones: a call in flight gives its sending
    # slot up after a while, so the later ones are sent.
    ray.init(backend="dask", num_cpus=2)
    n = 80
    barrier = _Barrier.remote(n)
    assert ray.get([barrier.arrive.remote() for _ in range(n)], timeout=LONG * 2) == [n] * n
