"""Redis as the cluster's control store: what only Redis does.

The semantics every store shares run in test_control_store.py (on Redis too).
Here: passwords and unreachable servers fail at once with clear errors that
never show the password; a Redis restarted with its data (AOF) leaves the
store working, subscriptions included; a compare-and-set retried across a lost
reply keeps the answer of the attempt that ran; ``init(control_store=...)``
puts the local backend's names in Redis; and RedisServer, which runs a private
redis-server, keeps its password off the command line and leaves nothing
behind. Every server is a real redis-server (a machine without one fails these
tests); tests that restart or stop one start their own.
"""
from __future__ import annotations

import os
import secrets
import socket
import stat
import threading

import procs
import pytest
import redis

import beamlet as ray
from beamlet import exceptions as exc
from beamlet.backends.redis.control_store import RedisControlStore
from beamlet.backends.redis.server import RedisServer
from beamlet.core.tables import ActorState, Tables

TIMEOUT = 60


def _namespace() -> str:
    return f"test-{secrets.token_hex(8)}"


def _closed_port() -> int:
    """A port of 127.0.0.1 on which nothing listens (it was free a moment ago)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def own_server(tmp_path):
    """A redis-server for one test, which may stop or restart it."""
    server = RedisServer(parent_dir=str(tmp_path))
    try:
        server.start()
    except exc.BackendError as err:
        pytest.fail(f"this test needs a real Redis: {err}")
    try:
        yield server
    finally:
        server.stop()


class _Inbox:
    def __init__(self):
        self.messages: list[bytes] = []
        self.cond = threading.Condition()

    def __call__(self, message: bytes) -> None:
        with self.cond:
            self.messages.append(message)
            self.cond.notify_all()


# -- refused and unreachable ------------------------------------------------------------
def test_a_wrong_password_is_refused_at_once_without_showing_it(redis_server):
    wrong = secrets.token_hex(16)
    with pytest.raises(exc.BackendError) as info:
        RedisControlStore(f"redis://:{wrong}@{redis_server.address}/0")
    message = str(info.value)
    assert redis_server.address in message and "password" in message, message
    assert wrong not in message and redis_server.password not in message


def test_no_password_is_refused_at_once(redis_server):
    with pytest.raises(exc.BackendError, match=f"{redis_server.address}.*refused"):
        RedisControlStore(f"redis://{redis_server.address}/0")


def test_an_unreachable_redis_is_a_clear_error(no_backend):
    port = _closed_port()
    with pytest.raises(exc.BackendError, match=f"127.0.0.1:{port}/0 did not answer for 1 s"):
        RedisControlStore(f"redis://:secret-pw@127.0.0.1:{port}/0?retry_for=1")
    with pytest.raises(exc.BackendError, match=f"127.0.0.1:{port}") as info:
        ray.init(backend="inprocess",
                 control_store=f"redis://:secret-pw@127.0.0.1:{port}?retry_for=1")
    assert "secret-pw" not in str(info.value)
    assert not ray.is_initialized()


@pytest.mark.parametrize("url, needle", [
    ("redis://:pw-123@localhost:notaport/0", "bad Redis URL"),
    ("redis://localhost:6379/0?namespace=a:b", "namespace"),
    ("redis://localhost:6379/0?retry_for=0", "retry_for must be a positive number"),
    ("redis://localhost:6379/0?timeout=never", "timeout must be a positive number"),
])
def test_bad_redis_urls_are_named(url, needle):
    with pytest.raises(ValueError, match=needle) as info:
        RedisControlStore(url)
    assert "pw-123" not in str(info.value)


# -- Redis restarts -----------------------------------------------------------------------
def test_data_and_subscriptions_survive_a_redis_restart(own_server):
    store = RedisControlStore(own_server.url, namespace=_namespace())
    try:
        tables = Tables(store)
        tables.register_node("node-1", "127.0.0.1:7000", {"CPU": 2.0}, now=1.0)
        store.put("t", b"k", b"before")
        inbox = _Inbox()
        store.subscribe("events", inbox)

        own_server.restart()

        assert store.get("t", b"k") == b"before"  # read back from the AOF
        assert tables.node("node-1").resources == {"CPU": 2.0}
        assert store.compare_and_set("t", b"k", b"before", b"after")
        assert tables.heartbeat("node-1", now=2.0).heartbeat == 2.0
        # The listener subscribes again by itself; until it has, messages are lost
        # (Redis keeps no history), so publish until one arrives.
        with inbox.cond:
            while not inbox.cond.wait_for(lambda: inbox.messages, 0.05):
                store.publish("events", b"after the restart")
                assert procs.alive(procs.proc_id(own_server.pid))
        late = _Inbox()
        store.subscribe("later", late)
        store.publish("later", b"x")
        with late.cond:
            assert late.cond.wait_for(lambda: late.messages == [b"x"], TIMEOUT)
    finally:
        store.close()


def test_a_call_while_redis_is_down_waits_for_it_then_gives_up(own_server):
    store = RedisControlStore(own_server.url, namespace=_namespace(), retry_for=1)
    patient = RedisControlStore(own_server.url, namespace=store.namespace, retry_for=TIMEOUT)
    try:
        store.put("t", b"k", b"v")
        own_server.stop(remove_dir=False)
        with pytest.raises(exc.BackendError, match=f"{own_server.address}/0 did not answer "
                                                   f"for 1 s \\(get\\)"):
            store.get("t", b"k")

        answers, calling = [], threading.Event()

        def read():
            calling.set()
            try:
                answers.append(patient.get("t", b"k"))
            except BaseException as err:  # noqa: BLE001 - handed to the test
                answers.append(err)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        calling.wait(TIMEOUT)
        own_server.start()  # same port, password and data
        reader.join(TIMEOUT)
        assert answers == [b"v"]
        assert store.get("t", b"k") == b"v"  # the impatient store works again too
    finally:
        store.close()
        patient.close()


def test_a_retried_compare_and_set_keeps_the_answer_of_the_attempt_that_ran(redis_server):
    """Redis runs a command even when its client has hung up meanwhile. Keep Redis
    busy in a script for 2 s: the store's compare-and-set times out (0.3 s), the
    store retries, and Redis then runs the first attempt and the retries. The
    retry must answer True, as the first attempt did, not False ("someone else
    wrote the key")."""
    store = RedisControlStore(redis_server.url, namespace=_namespace(), timeout=0.3,
                              retry_for=TIMEOUT)
    admin = redis.Redis.from_url(redis_server.url, socket_timeout=TIMEOUT)
    probe = redis.Redis.from_url(redis_server.url, socket_timeout=0.1)
    spin = ("local t0 = redis.call('TIME') repeat local t = redis.call('TIME') "
            "until (t[1] - t0[1]) * 1000000 + (t[2] - t0[2]) > 2000000 return 1")
    try:
        assert store.put("t", b"warm", b"up", overwrite=False)  # the scripts are loaded
        busy = threading.Thread(target=admin.eval, args=(spin, 0), daemon=True)
        busy.start()
        assert procs.wait_until(lambda: _unanswered(probe), TIMEOUT)
        assert store.compare_and_set("t", b"k", None, b"mine") is True
        busy.join(TIMEOUT)
        assert store.get("t", b"k") == b"mine"
    finally:
        store.close()
        admin.close()
        probe.close()


def _unanswered(client) -> bool:
    """Whether Redis is too busy to answer a PING within the client's timeout."""
    try:
        client.ping()
    except redis.exceptions.TimeoutError:
        return True
    return False


# -- through a backend ----------------------------------------------------------------------
@ray.remote
class Named:
    def ping(self):
        return "pong"


def test_init_with_redis_puts_named_actors_in_redis(start, redis_server):
    url = f"{redis_server.url}?namespace={_namespace()}"
    backend = start(control_store=url, namespace="apps")
    handle = Named.options(name="kept", lifetime="detached").remote()
    assert ray.get(handle.ping.remote(), timeout=TIMEOUT) == "pong"
    other = RedisControlStore(url)  # as a second driver, or a node, would
    try:
        tables = Tables(other)
        info = tables.named_actor("kept", "apps")
        assert info is not None and info.actor_id.hex() == handle.actor_id
        assert info.state is ActorState.ALIVE and info.class_name == "Named"
        ray.kill(handle)
        assert procs.wait_until(lambda: tables.named_actor("kept", "apps") is None, TIMEOUT)
        assert tables.actor(info.actor_id).state is ActorState.DEAD
        ray.shutdown()  # closes the driver's store: its connections are let go
        with pytest.raises(exc.BackendError):
            backend.control_store.get("t", "k")
        assert other.get("t", "k") is None  # (Redis itself is still there)
    finally:
        other.close()


# -- RedisServer -----------------------------------------------------------------------------
def test_redis_server_leaves_no_process_and_no_directory(tmp_path):
    server = RedisServer(parent_dir=str(tmp_path)).start()
    proc, data_dir = procs.proc_id(server.pid), server.dir
    assert procs.alive(proc) and os.path.isdir(data_dir)
    server.restart(kill=True)  # as a crash would end it
    assert not procs.alive(proc)
    second = procs.proc_id(server.pid)
    server.stop()
    server.stop()  # a second stop changes nothing
    assert not procs.alive(second) and not os.path.exists(data_dir)
    assert os.listdir(tmp_path) == []


def test_redis_server_keeps_its_password_private(own_server):
    with open(f"/proc/{own_server.pid}/cmdline", "rb") as f:
        argv = f.read()
    with open(f"/proc/{own_server.pid}/environ", "rb") as f:
        environ = f.read()
    password = own_server.password.encode()
    assert password not in argv and password not in environ
    assert stat.S_IMODE(os.stat(own_server.dir).st_mode) == 0o700
    for name in os.listdir(own_server.dir):
        path = os.path.join(own_server.dir, name)
        if os.path.isfile(path):
            assert stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0, name


def test_a_missing_redis_server_says_how_to_install_it(tmp_path):
    server = RedisServer(executable="beamlet-no-such-redis-server", parent_dir=str(tmp_path))
    with pytest.raises(exc.BackendError, match="not found on PATH.*apt-get install redis-server"):
        server.start()
    assert os.listdir(tmp_path) == []


def test_a_taken_port_is_a_clear_error_and_leaves_nothing(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = RedisServer(port=port, parent_dir=str(tmp_path))
        with pytest.raises(exc.BackendError, match=f"127.0.0.1:{port}.*Address already in use"):
            server.start()
    assert not server.running() and os.listdir(tmp_path) == []


def test_redis_server_rejects_a_bad_port():
    with pytest.raises(ValueError, match="port is a whole number"):
        RedisServer(port=70000)
