"""The cluster's transport (backends/zmq/transport.py) with real processes and
real TCP sockets on 127.0.0.1.

Peers run as subprocesses (`PEER`); the secret reaches them on their standard
input, never in argv. The listener runs in the test process, driven the way a
node's I/O loop drives it: select on `fileno`, then `poll`.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import select
import signal
import socket
import struct
import threading
import time

import numpy as np
import procs
import pytest

from beamlet import exceptions as exc
from beamlet.backends.zmq import transport as zt
from beamlet.backends.zmq.transport import ZmqTransport
from beamlet.core import auth
from beamlet.backends.local.transport import ProtocolError
from beamlet.core.interfaces import Joined, Left, Received

VERSION = "beamlet-test/1"
BIG = 100 * 1024 * 1024

# A peer process: argv is the listener's address, a mode and its arguments; the
# secret (hex) is the first line of stdin. It prints what it saw.
PEER = r'''
import hashlib, os, pickle, sys, time
secret = bytes.fromhex(sys.stdin.readline().strip())
address, mode, *args = sys.argv[1:]
VERSION = "beamlet-test/1"

def say(*words):
    print(*words, flush=True)

class Evil:  # unpickling it creates the file args[0]
    def __reduce__(self):
        return (open, (args[0], "w"))

if mode.startswith("raw-"):  # a stranger speaking raw ZeroMQ
    import zmq
    from zmq.utils.monitor import parse_monitor_message
    from beamlet.backends.zmq.transport import ClusterKey
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    if mode == "raw-curve":  # another security mechanism (a key pair of its own)
        public, private = zmq.curve_keypair()
        s.curve_serverkey, s.curve_publickey, s.curve_secretkey = (zmq.curve_keypair()[0],
                                                                   public, private)
    elif mode == "raw-wrong-secret":  # ZeroMQ credentials made with a key of its own
        s.plain_username, s.plain_password = ClusterKey(os.urandom(32)).credentials()
    elif mode in ("raw-no-hello", "raw-replayed"):  # good ones (it holds the key)
        s.plain_username, s.plain_password = ClusterKey(secret).credentials()
    if mode == "raw-replayed":  # another connection used them first
        first = ctx.socket(zmq.DEALER)
        first.plain_username, first.plain_password = s.plain_username, s.plain_password
        first_monitor = first.get_monitor_socket()
        first.connect("tcp://" + address)
        until = time.monotonic() + 30
        while time.monotonic() < until and first_monitor.poll(int((until - time.monotonic()) * 1000)):
            if parse_monitor_message(first_monitor.recv_multipart())["event"] == \
                    zmq.EVENT_HANDSHAKE_SUCCEEDED:
                say("FIRST IN")
                break
    monitor = s.get_monitor_socket()
    s.connect("tcp://" + address)
    got = []
    evil = pickle.dumps(Evil(), 5)
    until = time.monotonic() + 2.0
    while time.monotonic() < until:
        for frames in ([evil], [evil, evil], [b"S" + os.urandom(200)], [b"H" + b"x" * 5000],
                       [b"R" + os.urandom(32)], [b"W"], [b""]):
            try:
                s.send_multipart(frames, zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        time.sleep(0.05)
    seen = set()
    while monitor.poll(0):
        seen.add(zmq.Event(parse_monitor_message(monitor.recv_multipart())["event"]).name)
    while s.poll(0):
        got.append(s.recv_multipart())
    say("EVENTS", " ".join(sorted(seen)))
    say("GOT", repr(got[:3]))
    s.close(0)
    monitor.close(0)
    if mode == "raw-replayed":
        first.close(0)
        first_monitor.close(0)
    ctx.term()
    sys.exit(0)

import numpy as np
from beamlet import exceptions as exc
from beamlet.backends.zmq.transport import ZmqTransport, chunks
from beamlet.core import auth

if mode in ("connect", "connect-skewed"):  # args: version, timeout[, clock skew (s)]
    if mode == "connect-skewed":  # (this process's clock, as another machine's might be)
        real_time = time.time
        time.time = lambda: real_time() + float(args[2])
    t = ZmqTransport(secret, args[0])
    started = time.monotonic()
    try:
        c = t.connect(address, timeout=float(args[1]))
    except exc.BackendError as err:
        say("REFUSED", type(err).__name__, f"{time.monotonic() - started:.3f}", err)
    else:
        say("ACCEPTED")
        c.close()
    sys.exit(0)

if mode == "serve":  # a listener here; the test connects to it. args: version
    t = ZmqTransport(secret, args[0])
    listener = t.listen("127.0.0.1:0")
    say("LISTENING", listener.address)
    import select
    until = time.monotonic() + 120
    while time.monotonic() < until:
        select.select([listener], [], [], 0.2)
        for event in listener.poll():
            if type(event).__name__ == "Joined":
                event.conn.send("hello")
            elif type(event).__name__ == "Received":
                for m in event.messages:
                    event.conn.send(("echo", m))
    sys.exit(0)

t = ZmqTransport(secret, VERSION)
c = t.connect(address, timeout=30)
say("JOINED")

def finish():
    c.close()
    t.close()
    say("DONE")

def wait_eof():
    try:
        while True:
            c.recv(timeout=30)
    except EOFError as err:
        say("EOF", err)
    except Exception as err:
        say("ERROR", type(err).__name__, err)
    try:
        c.send("after")
    except exc.BackendError as err:
        say("SEND REFUSED", err)

if mode == "echo":  # echo every message until "stop"
    while True:
        m = c.recv(timeout=60)
        if isinstance(m, str) and m == "stop":
            break
        c.send(("echo", m))
    finish()
elif mode == "count":  # args: tag, n: send ("tag", tag), then (tag, i) for i < n
    tag, n = args[0], int(args[1])
    c.send(("tag", tag))
    for i in range(n):
        c.send((tag, i))
    assert c.recv(timeout=60) == "bye"
    finish()
elif mode == "sleep":
    time.sleep(300)
elif mode == "frame":  # args: hex of one raw frame, sent after a good message
    c.send("before")
    with c._lock:
        c._sock.send(bytes.fromhex(args[0]))
    wait_eof()
elif mode == "sealed":  # args: hex of one raw frame, sealed as a message of the connection
    c.send("before")
    with c._sealer.lock, c._lock:
        c._sock.send_multipart(c._sealer.seal([bytes.fromhex(args[0])]))
    wait_eof()
elif mode in ("replay", "reorder", "truncate", "other-connection"):
    # What an attacker on the wire can do to sealed messages, done to the frames
    # (each would unpickle an Evil, creating the file args[0], if it got through).
    def sealed(conn, message):
        from beamlet.backends.zmq.transport import pack
        with conn._sealer.lock:
            return conn._sealer.seal_parts(pack(message))
    def raw(conn, frames):
        with conn._lock:
            conn._sock.send_multipart(frames)
    if mode == "replay":  # a message sent again (delivered once only)
        frames = sealed(c, "before")
        raw(c, frames)
        raw(c, frames)
    else:
        c.send("before")
    if mode == "replay":
        pass
    elif mode == "reorder":  # two messages swapped
        first, second = sealed(c, ("first", 1)), sealed(c, ("evil", Evil()))
        raw(c, second)
        raw(c, first)
    elif mode == "truncate":  # a large buffer's last part cut short
        frames = sealed(c, ("evil", Evil(), memoryview(bytes(1 << 19))))
        raw(c, [*frames[:-1], frames[-1][:-4096]])
    else:  # a message of another connection of the same process, with the same key
        c2 = t.connect(address, timeout=30)
        raw(c, sealed(c2, ("evil", Evil())))
    wait_eof()
elif mode == "oversize-total":  # args: limit; three buffers, each under it, together over
    limit = int(args[0])
    c.send([memoryview(bytes(limit // 2)) for _ in range(3)])
    wait_eof()
elif mode == "oversize-frame":  # args: limit; one frame over it (send would cut it in parts)
    from beamlet.backends.zmq.transport import pack
    limit = int(args[0])
    with c._sealer.lock, c._lock:
        c._sock.send_multipart(c._sealer.seal(pack(memoryview(bytes(limit + 4096)))))
    wait_eof()
elif mode == "big":  # 100 MB, as one message and then in chunks
    data = np.random.default_rng(7).integers(0, 255, size=int(args[0]), dtype=np.uint8)
    digest = hashlib.sha256(data).hexdigest()
    c.send(("whole", digest, data))
    c.send(("size", data.nbytes))
    for offset, piece in chunks(data, 4 << 20):
        c.send(("chunk", offset, piece))
    c.send(("end", digest))
    assert c.recv(timeout=120) == "ok"
    finish()
'''


@pytest.fixture
def secret():
    return auth.new_secret()


@pytest.fixture
def listener(secret):
    transport = ZmqTransport(secret, VERSION)
    lst = transport.listen("127.0.0.1:0")
    try:
        yield lst
    finally:
        transport.close()


@pytest.fixture
def peers(tmp_path):
    """``peers(secret, address, mode, *args)`` starts a PEER process; all are
    killed (by pid) after the test."""
    started = []

    def start(secret: bytes, address: str, mode: str, *args) -> procs.Driver:
        peer = procs.Driver(PEER, tmp_path, args=[address, mode, *map(str, args)],
                            stdin=secret.hex() + "\n")
        started.append(peer)
        return peer

    yield start
    for peer in started:
        peer.kill()
        peer.finish(30)


def assert_still_serving(listener, conn) -> None:
    """An echoing peer on `conn` still gets an answer after what broke another
    peer; then it is told to stop, and leaves."""
    conn.send("still serving")
    back = serve_until(listener, lambda ev: of_kind(ev, Received))
    assert messages_of(back, conn) == [("echo", "still serving")]
    conn.send("stop")
    serve_until(listener, lambda ev: of_kind(ev, Left))


def serve_until(listener, done, timeout: float = 60.0, on_event=None) -> list:
    """Run the listener's event loop until ``done(events)``; every event so far."""
    events: list = []
    until = time.monotonic() + timeout
    while not done(events):
        left = until - time.monotonic()
        if left <= 0:
            raise AssertionError(f"not done within {timeout}s; events: {events}")
        select.select([listener], [], [], min(left, 0.2))
        new = listener.poll()
        for event in new:
            if on_event is not None:
                on_event(event)
        events += new
    return events


def connect_while_serving(listener, transport, timeout: float = 30.0):
    """Connect to a listener of this process, whose loop must run meanwhile
    (the handshake needs it): (the connection, the listener's events)."""
    result: dict = {}

    def connect():
        try:
            result["conn"] = transport.connect(listener.address, timeout=timeout)
        except BaseException as err:  # noqa: BLE001 - raised below, in the test
            result["error"] = err

    thread = threading.Thread(target=connect)
    thread.start()
    try:
        events = serve_until(listener, lambda ev: of_kind(ev, Joined) or "error" in result,
                             timeout=timeout + 10)
    finally:
        thread.join(timeout + 10)
    if "error" in result:
        raise result["error"]
    return result["conn"], events


def of_kind(events, kind) -> list:
    return [e for e in events if type(e) is kind]


def check_order(events) -> None:
    """Per peer: Joined first, Received between, nothing after Left."""
    state: dict = {}
    for e in events:
        seen = state.get(e.conn)
        if type(e) is Joined:
            assert seen is None, f"{e.conn} joined twice"
            state[e.conn] = "joined"
        else:
            assert seen == "joined", f"{type(e).__name__} of {e.conn} in state {seen}"
            if type(e) is Left:
                state[e.conn] = "left"


def messages_of(events, conn) -> list:
    return [m for e in events if type(e) is Received and e.conn is conn for m in e.messages]


# -- messages -----------------------------------------------------------------------------
def test_messages_round_trip_both_ways(listener, secret, peers):
    peer = peers(secret, listener.address, "echo")
    joined = serve_until(listener, lambda ev: of_kind(ev, Joined))
    conn = joined[0].conn
    array = np.arange(200_000, dtype=np.float64)  # 1.6 MB: out of band
    sent = [1, "two", {"three": [3.0]}, b"x" * 100, array[:10], array,
            memoryview(array).cast("B")[:300_000], None, ("last",)]
    for message in sent:
        conn.send(message)
    conn.send("stop")
    events = serve_until(listener, lambda ev: of_kind(ev, Left))
    check_order(joined + events)
    echoes = messages_of(events, conn)
    assert [e[0] for e in echoes] == ["echo"] * len(sent)
    for mine, (_, back) in zip(sent, echoes):
        if isinstance(mine, np.ndarray):
            np.testing.assert_array_equal(back, mine)
        elif isinstance(mine, memoryview):
            assert isinstance(back, memoryview) and back.tobytes() == mine.tobytes()
        else:
            assert back == mine
    assert of_kind(events, Left)[0].error is None
    assert peer.finish(30) == 0 and "DONE" in peer.stdout


def test_many_peers_each_message_is_attributed_to_its_connection_in_order(listener, secret,
                                                                         peers):
    n = 300
    tags = [f"peer{i}" for i in range(6)]
    started = [peers(secret, listener.address, "count", tag, n) for tag in tags]
    counts: dict = {}

    def on_event(event):
        if type(event) is Received:
            counts[event.conn] = counts.get(event.conn, 0) + len(event.messages)
            if counts[event.conn] == n + 1:
                event.conn.send("bye")

    try:
        events = serve_until(listener, lambda ev: len(of_kind(ev, Left)) == len(tags),
                             on_event=on_event)
    except AssertionError:
        for peer in started:
            print("PEER", peer.stdout, peer.stderr[-3000:])
        raise
    check_order(events)
    conns = [e.conn for e in of_kind(events, Joined)]
    assert len(set(conns)) == len(tags)
    seen_tags = []
    for conn in conns:
        got = messages_of(events, conn)
        first, rest = got[0], got[1:]
        assert first[0] == "tag"
        seen_tags.append(first[1])
        assert rest == [(first[1], i) for i in range(n)]
    assert sorted(seen_tags) == tags


def test_accept_and_recv_serve_one_peer_at_a_time(listener, secret, peers):
    peers(secret, listener.address, "count", "solo", 50)
    conn = listener.accept(timeout=60)
    assert conn.recv(timeout=60) == ("tag", "solo")
    got = [conn.recv(timeout=60) for _ in range(50)]
    assert got == [("solo", i) for i in range(50)]
    conn.send("bye")
    with pytest.raises(EOFError):
        conn.recv(timeout=60)
    with pytest.raises(exc.BackendError):
        conn.send("gone")
    with pytest.raises(exc.GetTimeoutError):
        listener.accept(timeout=0.2)
    with pytest.raises(RuntimeError, match="accept"):
        listener.poll()


def test_sends_from_many_threads_while_the_loop_polls(listener, secret, peers):
    peers(secret, listener.address, "echo")
    n_threads, n = 4, 300
    threads = []

    def start_senders(event):
        if type(event) is Joined:
            for k in range(n_threads):
                th = threading.Thread(target=lambda k=k: [event.conn.send((k, i))
                                                          for i in range(n)])
                th.start()
                threads.append(th)

    events = serve_until(listener, lambda ev: sum(len(e.messages) for e in ev
                                                  if type(e) is Received) == n_threads * n,
                         on_event=start_senders)
    for th in threads:
        th.join(30)
    conn = of_kind(events, Joined)[0].conn
    echoes = [m[1] for m in messages_of(events, conn)]
    for k in range(n_threads):
        assert [i for t, i in echoes if t == k] == list(range(n))
    conn.send("stop")
    serve_until(listener, lambda ev: of_kind(ev, Left))


def test_a_100mb_buffer_arrives_intact_whole_and_in_chunks(listener, secret, peers):
    peers(secret, listener.address, "big", BIG)
    state: dict = {}

    def on_event(event):
        if type(event) is not Received:
            return
        for m in event.messages:
            if m[0] == "whole":
                state["whole"] = (m[1], hashlib.sha256(m[2]).hexdigest(), m[2].nbytes)
            elif m[0] == "size":
                state["dest"] = np.empty(m[1], dtype=np.uint8)
            elif m[0] == "chunk":
                state["dest"][m[1]:m[1] + len(m[2])] = np.frombuffer(m[2], dtype=np.uint8)
                state["chunks"] = state.get("chunks", 0) + 1
            elif m[0] == "end":
                state["chunked"] = (m[1], hashlib.sha256(state.pop("dest")).hexdigest())
                event.conn.send("ok")

    serve_until(listener, lambda ev: of_kind(ev, Left), timeout=120, on_event=on_event)
    digest, got, size = state["whole"]
    assert got == digest and size == BIG
    assert state["chunked"][1] == state["chunked"][0] == digest
    assert state["chunks"] == BIG // (4 << 20)


def test_messages_over_the_limit_are_refused_by_send(secret):
    with pytest.raises(zt.ProtocolError, match="at most"):
        zt.pack(memoryview(bytes(4 << 20)), max_message=1 << 20)
    with pytest.raises(TypeError, match="cannot be sent"):
        zt.pack(lambda: 1)
    frames = zt.pack(("x", memoryview(bytes(1 << 20))))
    assert len(frames) == 2  # the pickle, then the buffer out of band
    assert zt.unpack(frames)[1].nbytes == 1 << 20


def test_chunks_cut_a_buffer_without_copying():
    data = bytearray(range(256)) * 1000
    pieces = list(zt.chunks(data, 1000))
    assert [o for o, _ in pieces] == list(range(0, len(data), 1000))
    assert b"".join(p for _, p in pieces) == data
    assert pieces[0][1].readonly and pieces[0][1].obj is data
    with pytest.raises(ValueError):
        list(zt.chunks(data, 0))


# -- strangers: refused, nothing they sent unpickled -----------------------------------------
def _serve_until_answered(listener, peer) -> list:
    """Run `listener` until `peer` reports it was accepted or refused (60 s at
    most); the listener's events meanwhile."""
    events = []
    until = time.monotonic() + 60
    while "REFUSED" not in peer.stdout and "ACCEPTED" not in peer.stdout:
        assert time.monotonic() < until, peer.stderr
        select.select([listener], [], [], 0.2)
        events += listener.poll()
    return events


def test_a_peer_with_a_wrong_secret_is_refused_at_once_and_logged(listener, peers, capfd):
    peer = peers(auth.new_secret(), listener.address, "connect", VERSION, 30)
    events = _serve_until_answered(listener, peer)
    assert peer.finish(30) == 0
    line = peer.wait_line("REFUSED ")
    assert line.startswith("AuthenticationError "), line  # not a timeout
    assert "refused the connection" in line and "different cluster keys" in line, line
    assert not events
    log = capfd.readouterr().err
    assert "refused a connection from " in log, log
    assert "does not hold the cluster's key" in log, log


def test_a_peer_whose_clock_is_off_is_refused_at_once_and_logged(listener, secret, peers, capfd):
    """A peer with the key whose clock is more than CLOCK_SKEW off the
    listener's is refused at once (its credentials could be replayed ones),
    and its error names the clocks; the listener logs the skew. (ZeroMQ
    tells the client a ZAP status code only, so it cannot tell this from a
    wrong key: a status of 300 makes ZeroMQ retry, not fail.)"""
    peer = peers(secret, listener.address, "connect-skewed", VERSION, 30, 2 * zt.CLOCK_SKEW)
    events = _serve_until_answered(listener, peer)
    assert peer.finish(30) == 0
    line = peer.wait_line("REFUSED ")
    assert line.startswith("AuthenticationError "), line
    assert "clocks of the two machines differ by more than" in line, line
    assert not events
    log = capfd.readouterr().err
    assert "s off this machine's clock" in log, log


def test_a_listener_without_the_secret_is_refused_by_the_client(secret, peers, capfd):
    server = peers(auth.new_secret(), "-", "serve", VERSION)
    address = server.wait_line("LISTENING ")
    with pytest.raises(auth.AuthenticationError, match="hold different cluster keys"):
        ZmqTransport(secret, VERSION).connect(address, timeout=30)


@pytest.mark.parametrize("mode", ["raw-plain", "raw-curve", "raw-wrong-secret", "raw-replayed",
                                  "raw-no-hello"])
def test_nothing_a_stranger_sends_is_unpickled(listener, secret, peers, tmp_path, capfd, mode):
    """Strangers: without ZeroMQ credentials (NULL), with another mechanism
    (CURVE), with credentials made with another key, or replaying another
    connection's, are refused by ZeroMQ before they can send a message; a
    peer with good credentials that skips beamlet's handshake is refused by
    it. Nothing any of them sends is unpickled."""
    target = tmp_path / "pwned"
    good = peers(secret, listener.address, "echo")
    stranger = peers(secret, listener.address, mode, target)
    joined = serve_until(listener, lambda ev: of_kind(ev, Joined))
    events = serve_until(listener, lambda ev: stranger.proc.poll() is not None)
    assert stranger.finish(30) == 0, stranger.stderr
    assert not target.exists(), "a stranger's pickle was unpickled"
    assert not of_kind(events, Joined) and not of_kind(events, Left), events
    conn = joined[0].conn
    assert_still_serving(listener, conn)
    assert not target.exists()
    log = capfd.readouterr().err
    # (a plain ZeroMQ peer may see the mismatch and hang up before the listener does)
    mismatch = ["does not speak this transport", "closed during the ZeroMQ handshake"]
    reasons = {"raw-curve": mismatch, "raw-plain": mismatch,
               "raw-wrong-secret": ["does not hold the cluster's key"],
               "raw-replayed": ["replayed credentials"],
               "raw-no-hello": ["without having said hello"]}[mode]
    assert "refused a connection from " in log and any(r in log for r in reasons), log
    if mode != "raw-no-hello":  # refused by ZeroMQ itself
        assert "HANDSHAKE_FAILED" in stranger.wait_line("EVENTS "), stranger.stdout
        assert stranger.wait_line("GOT ") == "[]"
        if mode == "raw-replayed":
            stranger.wait_line("FIRST IN")
    else:  # told why (once: what it sends next is not even read), never heard
        assert "without having said hello" in stranger.wait_line("GOT "), stranger.stdout
        assert log.count("refused a connection from ") == 1, log


def test_another_version_is_refused_naming_both(listener, secret, peers, capfd):
    peer = peers(secret, listener.address, "connect", "beamlet-test/2", 30)
    serve_until(listener, lambda ev: peer.proc.poll() is not None)
    line = peer.wait_line("REFUSED ")
    assert line.startswith("AuthenticationError "), line
    assert "beamlet-test/1" in line and "beamlet-test/2" in line, line
    log = capfd.readouterr().err
    assert "protocol version mismatch" in log and "beamlet-test/2" in log, log


# -- broken peers: dropped alone ---------------------------------------------------------
@pytest.mark.parametrize("mode,arg,why", [
    ("sealed", b"\x80\x05garbage".hex(), "does not unpickle"),
    ("frame", b"\x80\x05garbage".hex(), "not a sealed message"),  # a pickle, not sealed
    ("frame", b"Znot a message".hex(), "not a sealed message"),
    ("frame", (b"S" + bytes(100)).hex(), "does not authenticate"),  # forged
    ("replay", None, "does not authenticate"),
    ("reorder", None, "does not authenticate"),
    ("truncate", None, "does not authenticate"),
    ("other-connection", None, "does not authenticate"),
    ("oversize-total", 1 << 20, "at most"),
    ("oversize-frame", 1 << 20, None),  # cut by ZeroMQ at the frame's header
])
def test_a_broken_peer_is_dropped_and_the_others_served(secret, peers, capfd, tmp_path, mode,
                                                       arg, why):
    """A joined peer that breaks the protocol is dropped alone. Sealed messages
    replayed, reordered, cut, forged or moved from another connection (what an
    attacker on the wire can do) are refused before anything is unpickled."""
    target = tmp_path / "pwned"
    if arg is None:
        arg = target
    transport = ZmqTransport(secret, VERSION, max_message=1 << 20)
    try:
        listener = transport.listen()
        good = peers(secret, listener.address, "echo")
        joined = serve_until(listener, lambda ev: of_kind(ev, Joined))
        bad = peers(secret, listener.address, mode, arg)
        events = serve_until(listener, lambda ev: of_kind(ev, Left))
        check_order(joined + events)
        left = of_kind(events, Left)[0]
        assert left.conn is not joined[0].conn
        if why is None:
            assert left.error is None
        else:
            assert isinstance(left.error, zt.ProtocolError) and why in str(left.error)
            assert "closed the connection of 127.0.0.1" in capfd.readouterr().err
        if not mode.startswith("oversize"):
            assert messages_of(events, left.conn) == ["before"]
        assert not target.exists(), "a tampered message was unpickled"
        bad.wait_line("EOF ")  # the peer is told, and cannot send on
        bad.wait_line("SEND REFUSED ")
        conn = joined[0].conn
        assert_still_serving(listener, conn)
    finally:
        transport.close()


# -- liveness -----------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["kill", "stop"])
def test_a_dead_or_frozen_peer_is_reported_left(listener, secret, peers, how):
    """SIGKILL closes the peer's TCP connection at once; SIGSTOP leaves it open
    and only the heartbeats find it (after `DEAD_AFTER`, 10 s, of silence: the
    deadline here is only a guard against hanging)."""
    other = peers(secret, listener.address, "echo")
    victim = peers(secret, listener.address, "sleep")
    joined = serve_until(listener, lambda ev: len(of_kind(ev, Joined)) == 2)
    victim.wait_line("JOINED")
    victim.stop() if how == "stop" else victim.kill()
    events = serve_until(listener, lambda ev: of_kind(ev, Left), timeout=30)
    left = of_kind(events, Left)
    assert len(left) == 1 and left[0].error is None
    gone = left[0].conn
    with pytest.raises(exc.BackendError):
        gone.send("anyone there?")
    survivor = next(e.conn for e in joined if e.conn is not gone)
    survivor.send("stop")
    serve_until(listener, lambda ev: of_kind(ev, Left))
    assert other.finish(30) == 0


#: Seconds a peer is stopped in the tests of a starved peer: longer than the
#: heartbeats tolerated before (2 s), well under `DEAD_AFTER` (10 s).
STARVED = 4.0


def test_a_peer_stopped_for_seconds_is_not_taken_for_dead(listener, secret, peers):
    """A live peer that gets no CPU for a few seconds (SIGSTOP, then SIGCONT: a
    loaded machine) keeps its connection: nothing is reported Left, and it
    answers on it afterwards."""
    assert zt.dead_after() > STARVED * 2  # (the default: no BEAMLET_DEAD_AFTER here)
    peer = peers(secret, listener.address, "echo")
    conn = of_kind(serve_until(listener, lambda ev: of_kind(ev, Joined)), Joined)[0].conn
    peer.wait_line("JOINED")
    os.kill(peer.pid, signal.SIGSTOP)
    try:
        until = time.monotonic() + STARVED
        events = serve_until(listener, lambda ev: time.monotonic() >= until or of_kind(ev, Left))
    finally:
        os.kill(peer.pid, signal.SIGCONT)
    conn.send("still there?")
    events += serve_until(listener, lambda ev: of_kind(ev, Received) or of_kind(ev, Left))
    assert not of_kind(events, Left), events
    assert messages_of(events, conn) == [("echo", "still there?")]
    conn.send("stop")
    serve_until(listener, lambda ev: of_kind(ev, Left))
    assert peer.finish(30) == 0


def test_dead_after_comes_from_the_environment(secret, monkeypatch):
    monkeypatch.setenv("BEAMLET_DEAD_AFTER", "3")
    assert zt.dead_after() == 3.0 and zt.heartbeats(3.0) == (0.3, 3.0)
    assert ZmqTransport(secret, VERSION)._heartbeat == (0.3, 3.0)
    assert zt.heartbeats(zt.DEAD_AFTER) == (zt.HEARTBEAT_INTERVAL, zt.HEARTBEAT_TIMEOUT)
    for bad in ("0", "-1", "soon", "99999"):
        monkeypatch.setenv("BEAMLET_DEAD_AFTER", bad)
        with pytest.raises(ValueError, match="BEAMLET_DEAD_AFTER"):
            ZmqTransport(secret, VERSION)


def served(transport, address: str):
    """A connection to a "serve" peer at `address`, which greets and echoes."""
    conn = transport.connect(address, timeout=30)
    assert conn.recv(timeout=30) == "hello"
    conn.send("ping")
    assert conn.recv(timeout=30) == ("echo", "ping")
    return conn


def test_a_client_sees_the_listener_die(secret, peers):
    server = peers(secret, "-", "serve", VERSION)
    address = server.wait_line("LISTENING ")
    transport = ZmqTransport(secret, VERSION)
    try:
        conn = served(transport, address)
        server.kill()
        with pytest.raises(EOFError):
            conn.recv(timeout=30)
        with pytest.raises(EOFError):
            conn.recv_all()
        with pytest.raises(exc.BackendError, match="gone"):
            conn.send("anyone there?")
    finally:
        transport.close()


def test_a_client_sees_its_connection_closed_by_the_listener(listener, secret):
    transport = ZmqTransport(secret, VERSION)
    try:
        conn, events = connect_while_serving(listener, transport)
        peer = of_kind(events, Joined)[0].conn
        peer.send("one")
        peer.close()
        assert conn.recv(timeout=30) == "one"
        with pytest.raises(EOFError, match="closed by the listener"):
            conn.recv(timeout=30)
        with pytest.raises(exc.BackendError):
            peer.send("two")
    finally:
        transport.close()


class _Wrapping:
    """A codec for the tests: a message travels as ``("wire", message)``;
    anything else that arrives is refused."""

    @staticmethod
    def encode(message):
        return ("wire", message)

    @staticmethod
    def decode(frame):
        if type(frame) is not tuple or len(frame) != 2 or frame[0] != "wire":
            raise ValueError("not this codec's wire form")
        return frame[1]


def test_a_codec_applies_to_every_message_and_what_it_refuses_drops_the_peer(secret):
    transport = ZmqTransport(secret, VERSION, codec=_Wrapping)
    plain = ZmqTransport(secret, VERSION)
    try:
        listener = transport.listen("127.0.0.1:0")
        conn, events = connect_while_serving(listener, transport)
        peer = of_kind(events, Joined)[0].conn
        conn.send({"to": "listener"})
        events = serve_until(listener, lambda ev: of_kind(ev, Received))
        assert messages_of(events, peer) == [{"to": "listener"}]
        peer.send(["to", "client"])
        assert conn.recv(timeout=30) == ["to", "client"]
        # A peer without the codec: its message is not the codec's form.
        other, events = connect_while_serving(listener, plain)
        stranger = of_kind(events, Joined)[0].conn
        other.send(("wire",))
        events = serve_until(listener, lambda ev: of_kind(ev, Left))
        (left,) = of_kind(events, Left)
        assert left.conn is stranger
        assert "not one of the protocol's" in str(left.error), left.error
        conn.send("still served")
        events = serve_until(listener, lambda ev: of_kind(ev, Received))
        assert messages_of(events, peer) == ["still served"]
        # ... and the client side refuses what its codec does not take the same way.
        stranger_listener = plain.listen("127.0.0.1:0")
        client, events = connect_while_serving(stranger_listener, transport)
        of_kind(events, Joined)[0].conn.send("unwrapped")
        with pytest.raises(ProtocolError, match="not one of the protocol's"):
            client.recv(timeout=30)
    finally:
        transport.close()
        plain.close()


def test_the_cluster_codec_round_trips_its_messages_and_refuses_other_tuples():
    from beamlet.backends.zmq import protocol as P
    from beamlet.core.task_spec import ACTOR_METHOD, TaskSpec
    spec = TaskSpec(b"t" * 16, ACTOR_METHOD, b"", "A", [], {}, (b"r" * 16,), {}, 0, False,
                    b"a" * 16, "m", {"concurrency_group": "io"}, b"c" * 16, 2)
    for message in (P.RunTask(spec, [(b"o" * 16, (b"x", [], (), False))], [(b"p", "h:1")]),
                    P.NestedSubmit(spec, []), P.Objects([(b"r" * 16, (b"\x80", [], (), True))]),
                    P.StatusRequest(), P.Release([b"r" * 16]), P.KillActor(b"a", True),
                    P.Report([P.TaskProgress(b"t" * 16, 0, "RUNNING", 7, 1.5),
                              P.TaskFinished(b"t" * 16, 0, "FINISHED", 0.1, 7),
                              P.Lent(b"t" * 16, True)],
                             [(b"r" * 16, (b"\x80", [], (), False))])):
        wire = P.CODEC.encode(message)
        assert type(wire) is tuple and type(wire[0]) is int  # (no class to unpickle)
        assert b"protocol" not in pickle.dumps(wire, 5)  # (not even an event's)
        back = P.CODEC.decode(pickle.loads(pickle.dumps(wire, 5)))
        assert type(back) is type(message)
        if type(message) is P.Report:
            assert [type(e) for e in back.events] == [type(e) for e in message.events]
        if hasattr(message, "spec"):
            assert back.spec.__reduce__() == message.spec.__reduce__()
            assert back[1:] == message[1:]
        else:
            assert back == message
    for garbage in [(), ("RunTask",), (999, 1), (-1,), (P.CODEC.encode(P.StatusRequest())[0], 1),
                    P.CODEC.encode(P.RunTask(spec, [], []))[:2] + (1, 2, 3),
                    P.CODEC.encode(P.Report([], []))[:1] + ([(0, "n", "a", {})], []),
                    P.CODEC.encode(P.Report([], []))[:1] + ([P.CODEC.encode(P.Lent(b"t", 1))[:2]],
                                                            []),
                    P.CODEC.encode(P.Report([], []))[:1] + (["event"], [])]:
        with pytest.raises((ValueError, TypeError)):
            P.CODEC.decode(garbage)


def test_a_nodes_batch_too_large_for_a_message_goes_as_events_then_each_result_alone(secret):
    """A node's queued events and results (``DriverLink.flush``) past the
    largest message: the events go alone, then each result in a message of its
    own, the one too large for any as an error that says so, in order."""
    from beamlet.backends.zmq import protocol as P
    from beamlet.backends.zmq.jobs import DriverLink
    from beamlet.core.serialization import deserialize, serialize

    transport = ZmqTransport(secret, P.VERSION, max_message=1 << 20, codec=P.CODEC)
    try:
        listener = transport.listen("127.0.0.1:0")
        conn, events = connect_while_serving(listener, transport)
        link = DriverLink(None, of_kind(events, Joined)[0].conn, {})
        sent = [(b"a" * 16, serialize(b"x" * 1000)),
                (b"b" * 16, serialize(np.zeros(2 << 20, np.uint8))),  # (beyond any message)
                (b"c" * 16, serialize(np.ones(600 << 10, np.uint8)))]
        link.events = [P.Lent(b"t" * 16, True)]
        link.results = list(sent)
        link.flush()
        report = conn.recv(timeout=30)
        assert type(report) is P.Report
        assert report.events == [P.Lent(b"t" * 16, True)] and report.objects == []
        got = []
        for _ in sent:
            message = conn.recv(timeout=30)
            assert type(message) is P.Objects and len(message.objects) == 1
            got.append((message.objects[0][0], P.unwire(message.objects[0][1])))
        assert [i for i, _ in got] == [i for i, _ in sent]
        assert deserialize(got[0][1]) == b"x" * 1000
        assert got[1][1].is_error and "cannot be sent between nodes" in str(deserialize(got[1][1]))
        assert (np.asarray(deserialize(got[2][1])) == 1).all()
        assert not link.results and not link.events
    finally:
        transport.close()


# -- addresses and resources ----------------------------------------------------------------
@pytest.mark.parametrize("address", ["nohost", "host:", ":80", "host:port", "host:70000",
                                     "a b:1", "::1:80", "[zz]:80", 80, None])
def test_bad_addresses_are_refused_naming_the_problem(secret, address):
    transport = ZmqTransport(secret, VERSION)
    with pytest.raises(ValueError, match="port|address"):
        transport.connect(address, timeout=1)
    if address is not None:
        with pytest.raises(ValueError):
            transport.listen(address)


def test_ipv6_loopback(secret):
    transport, client = ZmqTransport(secret, VERSION), ZmqTransport(secret, VERSION)
    try:
        try:
            listener = transport.listen("[::1]:0")
        except exc.BackendError as err:
            pytest.skip(f"no IPv6 loopback here: {err}")
        assert listener.address.startswith("[::1]:")
        conn, events = connect_while_serving(listener, client)
        conn.send("over IPv6")
        got = serve_until(listener, lambda ev: of_kind(ev, Received))
        assert messages_of(got, of_kind(events, Joined)[0].conn) == ["over IPv6"]
    finally:
        client.close()
        transport.close()


def test_bad_transport_arguments_are_refused(secret):
    with pytest.raises(ValueError, match="secret"):
        ZmqTransport(b"short", VERSION)
    with pytest.raises(ValueError, match="version"):
        ZmqTransport(secret, "")
    with pytest.raises(ValueError, match="max_message"):
        ZmqTransport(secret, VERSION, max_message=10)


def test_nothing_listening_is_a_clear_error_not_a_hang(secret, listener):
    address = listener.address
    listener.close()
    with pytest.raises(exc.BackendError, match="nothing answered"):
        ZmqTransport(secret, VERSION).connect(address, timeout=0.5)


def test_one_listener_per_transport_and_a_taken_port_is_an_error(secret, listener):
    with pytest.raises(RuntimeError, match="already listens"):
        listener._transport.listen()
    other = ZmqTransport(secret, VERSION)
    with pytest.raises(exc.BackendError, match="cannot listen on 127.0.0.1"):
        other.listen(listener.address)
    other.close()


def test_listening_beyond_loopback_warns(secret, capfd):
    transport = ZmqTransport(secret, VERSION)
    try:
        listener = transport.listen("0.0.0.0:0")
        assert listener.address.startswith("0.0.0.0:")
        assert "beyond loopback" in capfd.readouterr().err
        listener.close()
        transport.listen("localhost:0")
        assert "beyond loopback" not in capfd.readouterr().err
    finally:
        transport.close()


def _descriptors() -> set:
    return set(os.listdir("/proc/self/fd"))


def _threads() -> set:
    return set(os.listdir("/proc/self/task"))


def test_close_leaves_no_thread_and_no_descriptor(secret):
    fds, threads = _descriptors(), _threads()
    server_side, client_side = ZmqTransport(secret, VERSION), ZmqTransport(secret, VERSION)
    listener = server_side.listen()
    conn, joined = connect_while_serving(listener, client_side)
    peer = of_kind(joined, Joined)[0].conn
    array = np.arange(1 << 18)  # 2 MB: a zero-copy send
    conn.send(array)
    events = serve_until(listener, lambda ev: of_kind(ev, Received))
    np.testing.assert_array_equal(messages_of(events, peer)[0], array)
    peer.send(array)
    np.testing.assert_array_equal(conn.recv(timeout=30), array)
    assert _threads() - threads and _descriptors() - fds  # (the check below can fail)
    conn.close()
    listener.close()
    assert procs.wait_until(lambda: not (_threads() - threads) and not (_descriptors() - fds),
                            10), (_threads() - threads, _descriptors() - fds)
    with pytest.raises(exc.BackendError):
        conn.send("closed")
    assert listener.poll() == []


# -- what a stranger can make a listener hold ---------------------------------------------
MIB = 1 << 20


def _greeting(mechanism: bytes) -> bytes:
    """A ZMTP 3.0 greeting, as a client sends it."""
    return b"\xff" + bytes(8) + b"\x7f\x03\x00" + mechanism.ljust(20, b"\0") + b"\0" + bytes(31)


def _memory_peak(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def _offer(address: str, opening: bytes, stream) -> int:
    """A stranger on a plain TCP socket: sends `opening`, then the byte strings
    of `stream` until the listener stops taking them (it closed the connection,
    or for 5 s it read nothing). How many bytes it got rid of."""
    host, port = address.rsplit(":", 1)
    sent = 0
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        try:
            sock.sendall(opening)
            for data in stream:
                sock.sendall(data)
                sent += len(data)
        except OSError:  # (reset, broken pipe, or the listener stopped reading: timeout)
            pass
    return sent


@pytest.mark.parametrize("attack", ["null-multipart", "plain-huge-hello",
                                    "plain-frames-before-hello", "plain-huge-frame"])
def test_a_stranger_cannot_make_a_listener_hold_more_than_a_frame(secret, peers, attack):
    """Before a peer proves that it holds the key, a listener reads at most one
    frame of `FRAME_LIMIT` bytes from it: ZeroMQ takes no message before the
    ZAP handler accepted the peer's credentials, and reads no frame (a
    handshake command included) larger than that. 256 MiB offered in each way
    a plain TCP client can: the listener's peak memory grows by far less, the
    stranger is cut off, and a client with the key still gets in."""
    server = peers(secret, "-", "serve", VERSION)
    address = server.wait_line("LISTENING ")
    before = _memory_peak(server.proc.pid)
    block = bytes(MIB)
    offered = 256 * MIB
    if attack == "null-multipart":  # no credentials; a message's frames, never its end
        opening = _greeting(b"NULL") + b"\x04\x1c\x05READY\x0bSocket-Type\x00\x00\x00\x06DEALER"
        stream = (b"\x03" + struct.pack(">Q", len(block)) + block for _ in range(256))
    elif attack == "plain-huge-hello":  # credentials that never end
        opening = _greeting(b"PLAIN") + b"\x06" + struct.pack(">Q", offered) + b"\x05HELLO"
        stream = (block for _ in range(256))
    elif attack == "plain-frames-before-hello":  # a message's frames instead of a hello
        opening = _greeting(b"PLAIN")
        stream = (b"\x03" + struct.pack(">Q", len(block)) + block for _ in range(256))
    else:  # one huge message frame instead of a hello
        opening = _greeting(b"PLAIN") + b"\x02" + struct.pack(">Q", offered)
        stream = (block for _ in range(256))
    sent = _offer(address, opening, stream)
    grown = _memory_peak(server.proc.pid) - before
    assert grown < 32 * MIB, f"the listener grew by {grown >> 20} MiB ({sent >> 20} MiB sent)"
    # A client with the key still gets in, and is served.
    transport = ZmqTransport(secret, VERSION)
    try:
        served(transport, address)
    finally:
        transport.close()
    server.kill()
    server.finish(30)
    assert "refused a connection from " in server.stderr and any(
        why in server.stderr for why in ("cut off in the ZeroMQ handshake",
                                         "does not speak this transport")), server.stderr
