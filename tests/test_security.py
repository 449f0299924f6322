"""The local backend against strangers and broken peers, with real processes and sockets.

The driver's socket has a name every local user can see, so anyone may
connect: a connection must prove it holds the session's secret before
anything it sends is unpickled (core/auth.py), and no peer, authenticated or
not, may stop the driver from serving the others. Strangers here are separate
processes (``STRANGER``) so that the driver sees a real peer pid.
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import struct
import subprocess
import sys
import threading

import procs
import pytest

import beamlet
from beamlet import exceptions as exc
from beamlet.backends.local import protocol as P
from beamlet.backends.local.transport import UnixSocketTransport
from beamlet.core import auth

# A process that connects to the driver's socket (argv: address, mode, path, and
# optionally a uid to become first) and tries something; the pickles it sends
# would create `path` if they were ever unpickled. It prints what it saw, then
# reads until the driver closes on it.
STRANGER = r'''
import os, pickle, socket, struct, sys
address, mode, path = sys.argv[1], sys.argv[2], sys.argv[3]
if len(sys.argv) > 4:
    os.setgid(int(sys.argv[4]))
    os.setuid(int(sys.argv[4]))

class Evil:
    def __reduce__(self):
        return (open, (path, "w"))

evil = pickle.dumps(Evil())
evil_frame = struct.pack("<I", len(evil)) + evil
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(60)
s.connect("\0" + address[1:])
try:
    if mode == "pickle":  # as if there were no handshake
        s.sendall(evil_frame)
    elif mode == "pickle-after-challenge":
        s.recv(4096)
        s.sendall(evil_frame)
    elif mode == "garbage":
        s.sendall(struct.pack("<I", 5) + b"hello")
    elif mode == "huge":  # announces 4 GB, sends 1 MB of it
        s.sendall(struct.pack("<I", 0xFFFFFFF0) + b"x" * (1 << 20))
    elif mode == "wrong-key":  # a correct handshake with another secret, then the pickle
        from beamlet.core import auth
        from beamlet.backends.local import protocol as P
        try:
            auth.join(s, os.urandom(32), P.VERSION)
            print("ACCEPTED")
        except auth.AuthenticationError as err:
            print("REFUSED", err)
        s.sendall(evil_frame)
except OSError as err:
    print("SEND FAILED", err)
try:
    while s.recv(65536):
        pass
    print("CLOSED")
except OSError as err:
    print("CLOSED", err)
'''

STRANGER_MODES = ["pickle", "pickle-after-challenge", "garbage", "huge", "wrong-key"]


def run_stranger(address: str, mode: str, path, *uid: str):
    """Run STRANGER to its end; (its CompletedProcess, its pid)."""
    proc = subprocess.Popen([sys.executable, "-c", STRANGER, address, mode, str(path), *uid],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=procs.driver_env())
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError(f"the stranger ({mode}) was not disconnected within 120s")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), proc.pid


@beamlet.remote
def add(a, b):
    return a + b


@beamlet.remote
def slow_add(a, b):
    import time
    time.sleep(0.3)
    return a + b


def assert_serving(n: int = 20) -> None:
    """The driver still runs tasks and answers `get`."""
    refs = [add.remote(i, 1) for i in range(n)]
    assert beamlet.get(refs, timeout=120) == [i + 1 for i in range(n)]


# -- strangers: refused before anything is unpickled -------------------------------------
@pytest.mark.parametrize("mode", STRANGER_MODES)
def test_a_stranger_is_refused_and_nothing_it_sent_runs(start, tmp_path, capfd, mode):
    backend = start()
    assert_serving()
    in_flight = slow_add.remote(1, 2)  # a get that spans the attack
    target = tmp_path / "pwned"
    result, pid = run_stranger(backend.node.listener.address, mode, target)
    assert "CLOSED" in result.stdout, (result.stdout, result.stderr)
    if mode == "wrong-key":
        assert "REFUSED the listener refused the connection: authentication failed" \
            in result.stdout, result.stdout
    assert not target.exists(), "the stranger's pickle was unpickled"
    assert beamlet.get(in_flight, timeout=120) == 3
    assert_serving()
    assert not target.exists()
    log = capfd.readouterr().err
    assert f"refused a connection from pid {pid} (uid {os.geteuid()})" in log, log


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as another user")
def test_a_process_of_another_user_is_refused(start, tmp_path, capfd):
    backend = start()
    target = tmp_path / "pwned"
    result, pid = run_stranger(backend.node.listener.address, "pickle-after-challenge", target,
                               "65534")
    assert "CLOSED" in result.stdout, (result.stdout, result.stderr)
    assert not target.exists()
    log = capfd.readouterr().err
    assert f"refused a connection from pid {pid} (uid 65534): it runs as uid 65534" in log, log
    assert_serving()


def test_a_silent_connection_does_not_stall_the_driver(start):
    """Connections that never finish the handshake (more of them than the
    driver keeps) do not keep workers from connecting or tasks from running."""
    from beamlet.backends.local.transport import MAX_PENDING_HANDSHAKES
    backend = start(prestart_workers=0)  # so every worker connects after the silent ones
    address = "\0" + backend.node.listener.address[1:]
    silent = []
    try:
        for _ in range(MAX_PENDING_HANDSHAKES + 1):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(60)
            s.connect(address)
            silent.append(s)
            assert s.recv(4096)  # the driver's challenge: it accepted and waits for us
        # The oldest was let go to make room; the others still wait.
        assert silent[0].recv(4096) == b""
        assert_serving()
        assert backend.scheduler.stats()["workers"] >= 1
    finally:
        for s in silent:
            s.close()


def test_a_connection_that_never_authenticates_is_closed_at_its_deadline(start, capfd,
                                                                         monkeypatch):
    backend = start()
    assert_serving()  # (the workers are connected: none authenticates under this deadline)
    monkeypatch.setattr(auth, "HANDSHAKE_TIMEOUT", 1.0)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(60)
        s.connect("\0" + backend.node.listener.address[1:])
        assert s.recv(4096)  # the challenge
        assert s.recv(4096) == b""  # never answered: closed
    assert "did not complete the handshake within 1.0s" in capfd.readouterr().err
    assert_serving()


def test_the_secret_is_in_no_command_line_or_environment(start):
    backend = start()
    assert_serving()
    # A worker's pid is known once it has connected (0 before): wait for both.
    def worker_pids():
        return [w.pid for w in backend.scheduler.workers.values()]
    procs.wait_until(lambda: len(worker_pids()) >= 2 and all(worker_pids()), 60)
    pids = [backend.node.launcher.proc.pid] + worker_pids()
    assert len(pids) >= 3 and all(pids), pids  # the zygote and two connected workers
    secret_hex = backend.node.secret.hex().encode()
    for pid in pids:
        for name in ("cmdline", "environ"):
            with open(f"/proc/{pid}/{name}", "rb") as f:
                data = f.read()
            assert secret_hex not in data and backend.node.secret not in data, (pid, name)
            assert secret_hex.upper() not in data, (pid, name)


# -- the handshake ---------------------------------------------------------------------
def test_the_right_secret_is_accepted_and_another_version_refused_naming_both(start):
    backend = start()
    address = backend.node.listener.address
    conn = UnixSocketTransport(backend.node.secret, P.VERSION).connect(address, timeout=30)
    try:
        # Authenticated, but not a worker the driver awaits: closed without a WELCOME.
        conn.send(P.Hello("not-a-worker", os.getpid()))
        with pytest.raises(EOFError):
            conn.recv(timeout=60)
    finally:
        conn.close()
    with pytest.raises(auth.AuthenticationError, match="authentication failed"):
        UnixSocketTransport(os.urandom(32), P.VERSION).connect(address, timeout=30)
    with pytest.raises(auth.AuthenticationError) as info:
        UnixSocketTransport(backend.node.secret, "beamlet-local/0").connect(address, timeout=30)
    assert "'beamlet-local/0'" in str(info.value) and repr(P.VERSION) in str(info.value)
    assert_serving()


def test_handshake_on_a_socket_pair():
    secret = auth.new_secret()
    a, b = socket.socketpair()
    with a, b:
        result = {}
        t = threading.Thread(target=lambda: result.update(server=auth.serve(a, secret, "v1")))
        t.start()
        client = auth.join(b, secret, "v1", timeout=30)
        t.join(30)
        assert client.session_key == result["server"].session_key
        assert len(client.session_key) == 32
    # The client checks the listener too: one that does not hold the secret
    # cannot forge its ACCEPT.
    a, b = socket.socketpair()
    with a, b:
        impostor = auth.ServerHandshake(auth.new_secret(), "v1")
        a.sendall(impostor.greeting)
        client = auth.ClientHandshake(secret, "v1")
        response = client.feed(b.recv(4096))
        assert response
        forged = b"A" + os.urandom(32)
        with pytest.raises(auth.AuthenticationError, match="does not hold the session's secret"):
            client.feed(struct.pack("<I", len(forged)) + forged)
    # A listener that never answers: the client gives up at its timeout.
    a, b = socket.socketpair()
    with a, b:
        with pytest.raises(auth.AuthenticationError, match="no handshake answer"):
            auth.join(b, secret, "v1", timeout=0.2)
    with pytest.raises(ValueError, match="at least 16 bytes"):
        auth.ServerHandshake(b"short", "v1")


def test_an_oversized_handshake_frame_is_refused_at_its_header():
    server = auth.ServerHandshake(auth.new_secret(), "v1")
    with pytest.raises(auth.AuthenticationError, match="at most 1024"):
        server.feed(struct.pack("<I", 1025))


# -- authenticated peers that break the protocol -------------------------------------
@beamlet.remote
def poison_once(marker: str):
    """On its first run, writes a garbage frame on its worker's own (authenticated)
    connection to the driver, and waits to be disconnected."""
    import os
    import struct
    import time

    from beamlet.core import runtime
    if not os.path.exists(marker):
        open(marker, "w").close()
        runtime.current().backend.conn.sock.sendall(struct.pack("<I", 5) + b"hello")
        time.sleep(60)
        return "not disconnected"
    return "second try"


def test_garbage_from_a_worker_closes_only_its_connection(start, tmp_path, capfd):
    backend = start()
    others = [slow_add.remote(i, 0) for i in range(4)]
    ref = poison_once.options(max_retries=1).remote(str(tmp_path / "marker"))
    assert beamlet.get(ref, timeout=120) == "second try"  # retried on another worker
    assert beamlet.get(others, timeout=120) == [0, 1, 2, 3]
    assert_serving()
    log = capfd.readouterr().err
    assert "closed the connection of worker" in log and "does not unpickle" in log, log
    # Without retries the task fails as for a crashed worker.
    (tmp_path / "marker2").unlink(missing_ok=True)
    ref = poison_once.options(max_retries=0).remote(str(tmp_path / "marker2"))
    with pytest.raises(exc.WorkerCrashedError):
        beamlet.get(ref, timeout=120)
    assert_serving()


@pytest.mark.parametrize("frame", [
    pytest.param(struct.pack("<I", 5) + b"hello", id="garbage"),
    pytest.param(struct.pack("<I", 0xFFFFFFF0), id="4GB-header"),
    pytest.param("shape", id="not-a-message"),
])
def test_an_authenticated_peer_sending_garbage_is_closed_alone(start, capfd, frame):
    backend = start()
    in_flight = slow_add.remote(2, 3)
    conn = UnixSocketTransport(backend.node.secret, P.VERSION).connect(backend.node.listener.address,
                                                                 timeout=30)
    try:
        if frame == "shape":
            conn.send(("not", "a", "message"))
        else:
            conn.sock.sendall(frame)
        with pytest.raises(EOFError):
            conn.recv(timeout=60)
    finally:
        conn.close()
    assert beamlet.get(in_flight, timeout=120) == 5
    assert_serving()
    log = capfd.readouterr().err
    expected = {"garbage": "does not unpickle", "4GB-header": "a frame announcing 4294967280",
                "not-a-message": "not one of the protocol's"}
    assert f"closed the connection of pid {os.getpid()}" in log
    assert any(text in log for text in expected.values()), log


def test_garbage_from_the_driver_makes_the_worker_exit(start):
    backend = start()
    assert_serving()
    with backend.scheduler.lock:  # (no EXECUTE can be sent meanwhile)
        worker = next(w for w in backend.scheduler.workers.values() if w.state == "IDLE")
        victim = procs.proc_id(worker.pid)
        worker.conn.sock.sendall(struct.pack("<I", 5) + b"hello")
    assert procs.wait_until(lambda: not procs.alive(victim), 60), "the worker did not exit"
    assert_serving()


# -- faults inside the driver: waiters fail, never hang --------------------------------
class _Injected(BaseException):
    """Raised inside the driver's I/O thread by the test below."""


@beamlet.remote
def sleeper():
    import time
    time.sleep(60)


def test_if_the_io_thread_dies_every_waiter_fails(start):
    backend = start()
    assert_serving()
    ref = sleeper.remote()
    early = ref.future()  # registered before the failure
    errors = []
    getter = threading.Thread(target=lambda: errors.append(_raises(beamlet.get, ref,
                                                                   timeout=120)))
    getter.start()
    # A fault from outside every handler (a BaseException in the thread itself).
    hit = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(backend.node._io.ident),
                                                     ctypes.py_object(_Injected))
    assert hit == 1
    backend.node._io.join(60)
    assert not backend.node._io.is_alive()
    getter.join(120)
    assert not getter.is_alive()
    assert isinstance(errors[0], exc.BackendError) and "I/O thread died" in str(errors[0])
    assert isinstance(early.exception(timeout=60), exc.BackendError)
    assert isinstance(ref.future().exception(timeout=60), exc.BackendError)
    with pytest.raises(exc.BackendError, match="I/O thread died"):
        beamlet.wait([ref], timeout=60)
    with pytest.raises(exc.BackendError, match="I/O thread died"):
        add.remote(1, 2)


def _raises(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except BaseException as err:  # noqa: BLE001
        return err
    return None


@pytest.mark.parametrize("how", ["exits-at-once", "cannot-be-run"])
def test_a_zygote_that_cannot_be_restarted_fails_what_waits_for_workers(start, how):
    backend = start(prestart_workers=0)
    launcher = backend.node.launcher
    # From now on a new zygote dies at once, or cannot even be executed.
    launcher._argv = ([sys.executable, "-c", "raise SystemExit(3)"] if how == "exits-at-once"
                      else [os.path.join(os.sep, "nonexistent", "python")])
    zygote = launcher.proc
    os.kill(zygote.pid, signal.SIGKILL)  # the backend's own zygote
    zygote.wait(30)

    @beamlet.remote
    class Actor:
        def ping(self):
            return "pong"

    ref = add.remote(1, 2)
    actor = Actor.remote()
    with pytest.raises(exc.BackendError, match="cannot start worker processes"):
        beamlet.get(ref, timeout=120)
    with pytest.raises(exc.ActorDiedError, match="cannot be started"):
        beamlet.get(actor.ping.remote(), timeout=120)
    # Later tasks fail at once too, rather than wait.
    with pytest.raises(exc.BackendError, match="cannot start worker processes"):
        beamlet.get(add.remote(3, 4), timeout=120)
