"""Direct driver -> actor-worker channels (issue 7): a sync actor call in two
thread wake-ups instead of eight.

Through a node, a call wakes the driver, its libzmq I/O thread, the node's
libzmq I/O thread, the daemon's main thread, the worker, the daemon's engine
thread, the node's libzmq I/O thread again, the driver's libzmq I/O thread
and the driver (benchmarks/README.md, "Where a cross-node actor call's time
goes"). A direct channel is one TCP connection from an actor's worker to
the driver that calls it: the call goes from the driver's thread to the
worker, its result back the same way.

Opening one
    The driver listens on one port of its own (`DirectHub`: plain TCP, on the
    address it reaches the head from, like Ray's driver; a node keeps its one
    port). After `OPEN_AFTER` calls of an actor through its node (one call
    never pays for a connection and a thread), the driver sends that node
    ``DirectOpen`` (the actor, its port, a fresh random token); the node,
    if the actor is alive there, tells the actor's worker (``DirectConnect``,
    on their authenticated Unix socket) to connect to the driver, with that
    channel's own key: `channel_secret`, derived from the token and
    `channel_key` (itself from the cluster's secret; a worker holds neither,
    so a worker of any job can prove only the channels it was asked to
    open). Calls go through the node meanwhile; an
    answer that does not come within `OPEN_TIMEOUT` leaves the actor on the
    node's path (asked again later).

Authentication, before anything is unpickled
    The worker first names the channel in clear (its `channel_id`, a fixed
    number of bytes): an id the driver has not pending closes the connection.
    Both ends then run ``core/auth.py``'s handshake on the raw stream, keyed by
    that channel's key, with fresh nonces from both sides and this protocol's
    `VERSION` inside both MACs: the driver proves the key to the worker and
    the worker to the driver. Handshake frames are at most
    ``auth.MAX_HANDSHAKE_FRAME`` bytes, so a peer without the key makes the
    driver read at most a few KiB (well under the cluster transport's
    ``FRAME_LIMIT``) before it is refused and logged; nothing it sends is
    unpickled. Then every frame is sealed as the cluster's transport seals a
    message: AES-256-GCM, one key per direction (derived from the
    handshake's session key, itself from both nonces), frame n under nonce
    n (`transport._Sealer`/`_Opener`): a frame forged, altered, replayed,
    reordered or cut fails its tag and closes the channel, unread. The
    worker's first sealed frame, raw bytes (not a pickle), holds the
    channel's token (compared in constant time) and its pid. Only then is
    anything unpickled.

Calls and results
    A call of that actor with inline arguments only (no refs among its
    arguments, one return value, not a generator, no ``retry_exceptions``)
    goes over the channel as its spec's fields; the worker reads its channels
    as it reads its node's socket (its main thread while it waits for work,
    its reader thread while a call runs long: ``local/worker.py``'s
    `_Reading`), runs the call in turn with those its node sends, and
    answers on the channel: the value if
    small (at most `RESULT_MAX` bytes) and holding no refs, else the node
    stores it as its own calls' results and sends it (or where it is) to the
    driver, and the channel says ``routed``. The node keeps the actor's
    state and CPUs, its other callers' calls, task ends as its observers see
    them; the driver records a direct call's progress and end itself (the
    worker sends its duration). Per caller, calls keep their order: the
    driver switches an actor's calls from the node's path to the channel only
    when none it sent through the node is unanswered, and back (a call that
    may not go direct) only once none is in flight on the channel (such a call
    waits in the channel's `after` queue meanwhile, and so do the calls
    behind it).

Cancelling one
    ``cancel()`` of a call in flight on a channel goes over it (its node never
    sees the call): its worker interrupts the call and, with ``recursive``
    (the default, as in Ray), cancels the tasks the call submitted (and
    those it submits from then on) through its node, as a task's own
    ``cancel()`` goes: that node cancels what it runs of them and of their
    children, and names the rest to the driver that placed them, which
    cancels them where they run. ``force=True`` is refused for actor calls,
    as through the node (Ray's rule). The driver tells the call's end as
    CANCELLED (`ClusterScheduler.cancelled_calls`).

Failures
    A worker that dies closes its end at once (the kernel does). The driver
    then sends its node ``DirectLost`` with the calls still in flight on the
    channel; the node waits until it has seen the worker die (at most
    `LOST_WAIT` seconds: a channel that broke with its worker alive fails
    them with ``ActorUnavailableError``), then treats them as the calls that
    worker had in flight: retried on the restarted actor per
    ``max_task_retries`` (``ActorUnavailableError`` without retries left),
    or ``ActorDiedError`` if it is dead; the driver's later calls of that
    actor run behind them. A node that dies fails its direct calls as all
    calls placed there (and the calls queued behind its channels are
    submitted again, to the actor restarted elsewhere if it was). The driver
    never blocks on a send (it sends under its scheduler's lock): what a
    worker does not read at once waits in the channel's outgoing buffer,
    sent by the hub's writer thread; a worker that reads nothing of it for
    `SEND_TIMEOUT` seconds, or leaves more than `OUT_MAX` bytes unread,
    loses its channel as above. Every blocking step has a timeout (connect,
    handshake, the first frame, a worker's sends: `SEND_TIMEOUT`).
"""
from __future__ import annotations

import hmac
import os
import pickle
import secrets
import select
import socket
import struct
import sys
import threading
import time

from ... import exceptions as exc
from ...core import auth
from ..local.transport import ProtocolError
from . import protocol as P
from .transport import _Opener, _Sealer, parse_address

#: Bound into the handshake's MACs: a peer of another version is refused.
VERSION = P.VERSION + "/direct-3"
#: Calls of an actor through its node before its channel is asked for.
OPEN_AFTER = 2
#: Seconds the driver waits for an asked-for channel before giving up (for now).
OPEN_TIMEOUT = 5.0
#: Seconds before a channel that was refused or lost may be asked for again.
REOPEN_AFTER = 2.0
#: Seconds each side gives the handshake and the worker's first frame.
HANDSHAKE_TIMEOUT = 5.0
#: Connections the driver admits at once (each a thread, for at most
#: `HANDSHAKE_TIMEOUT`); more are closed at once.
MAX_ADMITTING = 32
#: Seconds a peer may leave what was sent to it unread (then the channel is broken).
SEND_TIMEOUT = 30.0
#: Bytes the driver keeps for a channel whose worker does not read (more: broken).
OUT_MAX = 64 << 20
#: The largest sealed frame either side reads (bytes), checked at its header.
MAX_FRAME = 64 << 20
#: A call whose spec pickles larger than this goes through the node.
CALL_MAX = 1 << 20
#: A result larger than this (bytes) goes through the node's store.
RESULT_MAX = 1 << 20
#: Seconds a node waits to see the worker of a lost channel die (see "Failures").
LOST_WAIT = 5.0
_HEAD = struct.Struct("<I")
_RECV = 1 << 16
#: The worker's first bytes, in clear: this, then the channel's id (`channel_id`).
_GREETING = b"beamlet-direct\0"
_ID_SIZE = 32
#: The worker's first sealed frame (raw bytes, never unpickled): this, the token, its pid.
_HELLO = b"hello\0"
_PID = struct.Struct("<q")


def enabled() -> bool:
    """``BEAMLET_DIRECT_CALLS`` (1, the default: drivers open direct channels; 0: never)."""
    value = os.environ.get("BEAMLET_DIRECT_CALLS", "1")
    if value not in ("0", "1"):
        raise ValueError(f"BEAMLET_DIRECT_CALLS must be 0 or 1, not {value!r}")
    return value == "1"


def channel_key(secret: bytes) -> bytes:
    """The key channels' keys are derived from (from the cluster's secret):
    only nodes and drivers hold it, never a worker (see `channel_secret`)."""
    return hmac.digest(auth.check_secret(secret), b"beamlet direct channel\0key", "sha256")


def channel_secret(key: bytes, token: bytes) -> bytes:
    """The key both ends of channel `token` prove: from `channel_key`'s `key`
    and the token, so that a worker, which gets only its own channels' keys,
    cannot prove any other channel's."""
    return hmac.digest(key, b"beamlet direct channel\0" + token, "sha256")


def channel_id(token: bytes) -> bytes:
    """The public name of channel `token`, sent in clear before the handshake
    (the driver picks the channel's key by it; it tells nothing of the key)."""
    return hmac.digest(token, b"beamlet direct channel\0id", "sha256")


def call_tag(key: bytes, token: bytes, task_id: bytes, return_id: bytes) -> bytes:
    """The driver's word (with `channel_key`'s `key`, which nodes hold and
    workers do not) that it sent call `task_id` (returning `return_id`) on
    channel `token`: the node takes a worker's results of a direct call
    (``DirectDone``) only with it, so a worker cannot finish other calls."""
    return hmac.digest(key, b"beamlet direct call\0" + token + task_id + return_id,
                       "sha256")[:16]


def _recv_exactly(sock: socket.socket, size: int, until: float) -> bytes:
    """`size` bytes from `sock` by monotonic time `until`; BackendError if not."""
    data = b""
    while len(data) < size:
        left = until - time.monotonic()
        if left <= 0:
            raise exc.BackendError("no channel id within the handshake's time")
        sock.settimeout(left)
        try:
            chunk = sock.recv(size - len(data))
        except (socket.timeout, OSError) as err:
            raise exc.BackendError(f"no channel id: {err}") from None
        if not chunk:
            raise exc.BackendError("the peer closed before naming a channel")
        data += chunk
    return data


def eligible(spec) -> bool:
    """Whether an actor call may go over a direct channel (see "Calls and results")."""
    if spec.generator is not None or len(spec.return_ids) != 1 or spec.retry_exceptions:
        return False
    if spec.args or spec.kwargs:
        if spec.has_ref_args() or spec.contained_refs():
            return False
    return True


class Wire:
    """One authenticated direct channel: length-prefixed frames, each sealed
    (AES-256-GCM, a key per direction). `send` from any thread; `recv_all`
    from one reader at a time."""

    def __init__(self, sock: socket.socket, session_key: bytes, driver: bool,
                 leftover: bytes = b""):
        up = hmac.digest(session_key, b"worker to driver", "sha256")
        down = hmac.digest(session_key, b"driver to worker", "sha256")
        self.sock = sock
        self._sealer = _Sealer(down if driver else up)
        self._opener = _Opener(up if driver else down)
        self._buf = bytearray(leftover)
        self._out = bytearray()  # (the driver's: sealed, not yet taken by the socket)
        self._since = 0.0  # (when it last took some of them)
        self.owner = None  # (the driver's: its Channel)
        self.closed = False
        sock.settimeout(None)
        # (An OS-level send timeout: a blocking send to a peer that stopped
        # reading fails instead of hanging; reads never block: MSG_DONTWAIT.)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                        struct.pack("ll", int(SEND_TIMEOUT), 0))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # (A peer whose machine went away, or a partition: the kernel finds out.)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3),
                              ("TCP_USER_TIMEOUT", int(SEND_TIMEOUT * 1000))):
            if hasattr(socket, option):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, message) -> None:
        """Send `message` (a tuple of plain values); BackendError if the channel is broken."""
        self.send_pickled(pickle.dumps(message, 5))

    def send_pickled(self, data: bytes) -> None:
        """`send` of a message pickled already."""
        sealer = self._sealer
        try:
            with sealer.lock:
                sealed = sealer.seal_one(data)
                self.sock.sendall(_HEAD.pack(len(sealed)) + sealed)
        except OSError as err:
            raise exc.BackendError(f"the direct channel is broken: {err}") from None

    def send_nowait(self, data: bytes, backlog) -> int:
        """(The driver.) `send_pickled` that never blocks: what the socket does
        not take now waits in the wire's outgoing buffer (`flush` sends it;
        `backlog(self)` is called, under the same lock as `flush`'s
        `emptied`, when the buffer holds something). The bytes waiting;
        BackendError if the channel is broken."""
        sealer = self._sealer
        with sealer.lock:
            sealed = sealer.seal_one(data)
            out = self._out
            if not out:
                frame = _HEAD.pack(len(sealed)) + sealed
                try:
                    sent = self.sock.send(frame, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    sent = 0
                except OSError as err:
                    raise exc.BackendError(f"the direct channel is broken: {err}") from None
                if sent == len(frame):
                    return 0
                self._since = time.monotonic()
                out += memoryview(frame)[sent:]
                backlog(self)
            else:
                out += _HEAD.pack(len(sealed))
                out += sealed
            return len(out)

    def flush(self, emptied) -> int:
        """(The driver.) Send what waits, without blocking (`emptied(self)`,
        under the lock, once nothing does); the bytes still waiting.
        BackendError if the channel is broken, or its peer read nothing for
        `SEND_TIMEOUT` seconds."""
        with self._sealer.lock:
            out = self._out
            while out:
                try:
                    sent = self.sock.send(out, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                except OSError as err:
                    raise exc.BackendError(f"the direct channel is broken: {err}") from None
                del out[:sent]
                self._since = time.monotonic()
            if not out:
                emptied(self)
            elif time.monotonic() - self._since > SEND_TIMEOUT:
                raise exc.BackendError(f"the direct channel's worker read nothing for "
                                       f"{SEND_TIMEOUT}s")
            return len(out)

    def buffered(self) -> bool:
        buf = self._buf
        return len(buf) >= 4 and len(buf) - 4 >= _HEAD.unpack_from(buf)[0]

    def wait(self, timeout: float) -> bool:
        """Whether something can be read within `timeout` seconds."""
        return self.buffered() or bool(self._poll.poll(max(0.0, timeout) * 1000))

    def recv_raw(self, until: float) -> bytes:
        """The plaintext of the next frame, not unpickled (the hello), by
        monotonic time `until`; BackendError, EOFError or ProtocolError if not."""
        buf = self._buf
        while True:
            if len(buf) >= 4:
                (size,) = _HEAD.unpack_from(buf)
                if size > 4096 or size < 17:
                    raise ProtocolError(f"a direct channel's hello of {size} bytes")
                if len(buf) >= 4 + size:
                    frame = bytes(buf[4:4 + size])
                    del buf[:4 + size]
                    if frame[:1] != b"S":
                        raise ProtocolError("a direct channel's frame that is not sealed")
                    return bytes(self._opener.open([frame], 4096)[0])
            left = until - time.monotonic()
            if left <= 0 or not self._poll.poll(left * 1000):
                raise exc.BackendError("no hello within the handshake's time")
            try:
                chunk = self.sock.recv(4096, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except OSError as err:
                raise EOFError(f"the direct channel broke: {err}") from None
            if not chunk:
                raise EOFError("the direct channel was closed by its peer")
            buf += chunk

    def recv_all(self) -> list:
        """Every whole message that arrived (possibly none), without blocking.
        EOFError once the peer closed; ProtocolError for a frame that is too
        large or does not authenticate (then the channel must be closed)."""
        buf = self._buf
        eof = False
        for _ in range(64):  # (a large result: read on, a bounded while)
            try:
                chunk = self.sock.recv(_RECV, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError:
                eof = True
                break
            if not chunk:
                eof = True
                break
            buf += chunk
            if len(chunk) < _RECV:
                break
        out = []
        while len(buf) >= 4:
            (size,) = _HEAD.unpack_from(buf)
            if size > MAX_FRAME or size < 17:
                raise ProtocolError(f"a direct channel's frame of {size} bytes (1 + 16 to "
                                    f"{MAX_FRAME} are allowed)")
            if len(buf) < 4 + size:
                break
            frame = bytes(buf[4:4 + size])
            del buf[:4 + size]
            if frame[:1] != b"S":
                raise ProtocolError("a direct channel's frame that is not sealed")
            out.append(self._opener.message_one(frame, MAX_FRAME))
        if eof and not out:
            raise EOFError("the direct channel was closed by its peer")
        return out

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass


def connect(address: str, key: bytes, token: bytes, timeout: float = HANDSHAKE_TIMEOUT) -> Wire:
    """(A worker.) Connect to the driver's port, name the channel (its
    `channel_id`, in clear), prove `key` (the channel's own:
    `channel_secret`) and check the driver's proof, then say hello (the
    token and this pid, sealed); AuthenticationError or BackendError within
    `timeout` seconds."""
    host, port = parse_address(address)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as err:
        raise exc.BackendError(f"cannot reach the driver's direct port {address}: {err}") \
            from None
    try:
        sock.settimeout(timeout)
        sock.sendall(_GREETING + channel_id(token))
        handshake = auth.join(sock, key, VERSION, timeout)
        wire = Wire(sock, handshake.session_key, driver=False, leftover=handshake.leftover)
        wire.send_pickled(_HELLO + token + _PID.pack(os.getpid()))
    except OSError as err:
        sock.close()
        raise exc.BackendError(f"the driver's direct port {address} failed: {err}") from None
    except BaseException:
        sock.close()
        raise
    return wire


def _local_address_towards(host: str) -> str:
    """This machine's address on the route to `host` (no packet is sent)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((host, 9))
            return probe.getsockname()[0]
        except OSError:
            return "127.0.0.1" if family == socket.AF_INET else "::1"


class Channel:
    """(The driver's side.) A direct channel to one actor's worker."""

    __slots__ = ("actor_id", "node", "token", "key", "id", "wire", "state", "inflight",
                 "after", "node_rids", "asked_at", "pid", "reading", "releases", "sent")

    def __init__(self, actor_id: bytes, node, token: bytes, node_rids: list, key: bytes):
        self.actor_id = actor_id
        self.node = node  # the NodeLink of the actor's node
        self.token = token
        self.key = key  # (`channel_secret`: the channel's own)
        self.id = channel_id(token)
        self.wire: Wire | None = None
        self.state = "opening"  # -> "open" -> ("closing" ->) "closed"
        self.inflight: dict = {}  # task id -> spec, sent on the channel, unanswered
        self.after: list = []  # calls for the node's path, behind those in flight here
        self.node_rids: list = node_rids  # returns of the calls sent through the node
        self.asked_at = time.monotonic()
        self.pid = None
        self.reading = threading.Lock()  # (one reader at a time: see ClusterBackend)
        self.releases: list = []  # the actor's token, released once nothing is in flight
        self.sent = 0  # calls sent over it


class DirectHub:
    """The driver's direct channels: its listening port (an acceptor thread
    runs the handshakes) and a `Channel` per actor (see the module's
    docstring). Under the scheduler's lock: `by_actor`, `pending`, `calls`."""

    def __init__(self, secret: bytes, head_host: str, on_open, on_lost=None):
        self.key = channel_key(secret)
        host = _local_address_towards(head_host)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, 0))
        self._listener.listen(64)
        port = self._listener.getsockname()[1]
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._on_open = on_open  # on_open(channel, wire, pid) -> whether it was taken
        self._on_lost = on_lost  # on_lost(channel): a send failed (see `send`)
        #: Wires with output waiting -> their channels (changed under the wire's lock).
        self._flushing: dict = {}
        self._flush_r, self._flush_w = os.pipe()
        os.set_blocking(self._flush_w, False)
        self.by_actor: dict = {}  # actor id -> Channel (opening or open)
        self.pending: dict = {}  # channel id -> Channel, until its worker connects
        self.calls: dict = {}  # actor id -> its calls through the node (see OPEN_AFTER)
        #: Actor id -> when its channel may be asked for again (see `lost`).
        self.closed_at: dict = {}
        self.failed: dict = {}  # actor id -> its channels that never opened, in a row
        self._wake_r, self._wake_w = os.pipe()
        self._closed = False
        self._admitting = threading.BoundedSemaphore(MAX_ADMITTING)
        self._admits: dict = {}  # thread -> the socket it admits
        self._thread = threading.Thread(target=self._accept_loop, name="beamlet-direct-accept",
                                        daemon=True)
        self._thread.start()
        self._writer = threading.Thread(target=self._write_loop, name="beamlet-direct-write",
                                        daemon=True)
        self._writer.start()

    def send(self, channel: Channel, data: bytes) -> None:
        """Send a pickled message on an open channel, never blocking (under
        the scheduler's lock too): what its socket does not take now is sent
        by the hub's writer thread, which calls `on_lost(channel)` if the
        worker reads nothing for `SEND_TIMEOUT` seconds. BackendError: the
        channel is broken, or holds more than `OUT_MAX` bytes unread (lost)."""
        if channel.wire.send_nowait(data, self._backlog) > OUT_MAX:
            raise exc.BackendError(f"the direct channel's worker left more than {OUT_MAX} "
                                   f"bytes unread")

    def _backlog(self, wire: Wire) -> None:
        if wire not in self._flushing:
            self._flushing[wire] = wire.owner
            try:
                os.write(self._flush_w, b"x")
            except BlockingIOError:
                pass  # (the writer is awake already)

    def _write_loop(self) -> None:
        """(The writer thread.) Send what waits on channels whose workers read slowly."""
        while not self._closed:
            flushing = list(self._flushing.items())
            poller = select.poll()
            poller.register(self._flush_r, select.POLLIN)
            for wire, _ in flushing:
                if not wire.closed:
                    poller.register(wire.fileno(), select.POLLOUT)
            ready = dict(poller.poll(1000))
            if self._flush_r in ready:
                os.read(self._flush_r, 4096)
            for wire, channel in flushing:
                if wire.closed:
                    self._flushing.pop(wire, None)
                    continue
                try:
                    wire.flush(self._emptied)
                except exc.BackendError as err:
                    self._flushing.pop(wire, None)
                    print(f"beamlet: a direct channel is lost: {err}", file=sys.stderr,
                          flush=True)
                    if channel is not None and self._on_lost is not None:
                        self._on_lost(channel)
                    else:
                        wire.close()

    def _emptied(self, wire: Wire) -> None:
        self._flushing.pop(wire, None)

    def lost(self, actor_id: bytes, opened: bool) -> None:
        """(Under the lock.) The actor's channel closed (`opened`), or never
        opened: it may be asked for again after `REOPEN_AFTER` seconds, twice
        as long after each one in a row that never opened (at most 32 times)."""
        now = time.monotonic()
        if len(self.closed_at) >= 4096:  # (of actors gone, or long ago)
            for key, until in list(self.closed_at.items()):
                if until <= now:
                    del self.closed_at[key]
                    self.failed.pop(key, None)
        failed = 0 if opened else self.failed.get(actor_id, 0) + 1
        if failed:
            self.failed[actor_id] = failed
        else:
            self.failed.pop(actor_id, None)
        self.closed_at[actor_id] = now + REOPEN_AFTER * (1 << min(failed, 5))

    def forget(self, actor_id: bytes) -> None:
        """(Under the lock.) The actor's handle is gone: what was kept of its channels."""
        self.calls.pop(actor_id, None)
        self.closed_at.pop(actor_id, None)
        self.failed.pop(actor_id, None)

    def ask(self, actor_id: bytes, node, node_rids: list) -> Channel:
        """A new channel to the actor's worker on `node`, asked for (under the lock)."""
        token = secrets.token_bytes(16)
        channel = Channel(actor_id, node, token, node_rids, channel_secret(self.key, token))
        self.by_actor[actor_id] = channel
        self.pending[channel.id] = channel
        node.send(P.DirectOpen(actor_id, self.address, token))
        return channel

    def _accept_loop(self) -> None:
        poller = select.poll()
        poller.register(self._listener.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._closed:
            ready = dict(poller.poll(1000))
            if self._closed or self._wake_r in ready:
                break
            if not ready:
                continue
            try:
                sock, peer = self._listener.accept()
            except OSError:
                continue
            if not self._admitting.acquire(False):
                print(f"beamlet: refused a direct channel from {peer}: {MAX_ADMITTING} "
                      f"connections are being admitted", file=sys.stderr, flush=True)
                sock.close()
                continue
            # (One thread each: a peer that sends nothing holds up no other.)
            thread = threading.Thread(target=self._admit_one, args=(sock, peer), daemon=True,
                                      name="beamlet-direct-admit")
            self._admits[thread] = sock
            thread.start()

    def _admit_one(self, sock: socket.socket, peer) -> None:
        try:
            self._admit(sock, peer)
        except Exception as err:  # noqa: BLE001 - a bad peer must not stop the acceptor
            if not self._closed:
                print(f"beamlet: refused a direct channel from {peer}: {err}",
                      file=sys.stderr, flush=True)
            sock.close()
        finally:
            self._admits.pop(threading.current_thread(), None)
            self._admitting.release()

    def _admit(self, sock: socket.socket, peer) -> None:
        """Within `HANDSHAKE_TIMEOUT`: the channel's id (in clear: an id not
        pending closes the connection), the handshake with that channel's key,
        then its hello (raw bytes: the token and the worker's pid). Nothing is
        unpickled before all three passed; raises for a peer that fails one."""
        until = time.monotonic() + HANDSHAKE_TIMEOUT
        greeting = _recv_exactly(sock, len(_GREETING) + _ID_SIZE, until)
        if greeting[:len(_GREETING)] != _GREETING:
            raise ProtocolError("not a direct channel's greeting")
        channel = self.pending.get(greeting[len(_GREETING):])
        if channel is None:
            raise ProtocolError("a direct channel nobody asked for (or no longer)")
        handshake = auth.serve(sock, channel.key, VERSION, max(0.001, until - time.monotonic()))
        wire = Wire(sock, handshake.session_key, driver=True, leftover=handshake.leftover)
        hello = wire.recv_raw(until)
        expected = _HELLO + channel.token
        if len(hello) != len(expected) + _PID.size or \
                not hmac.compare_digest(hello[:len(expected)], expected):
            raise ProtocolError("the first frame is not the channel's hello")
        (pid,) = _PID.unpack_from(hello, len(expected))
        wire.owner = channel
        if self.pending.pop(channel.id, None) is not channel or \
                not self._on_open(channel, wire, pid):
            raise ProtocolError("a direct channel nobody asked for (or no longer)")

    def close(self) -> None:
        """Stop accepting (the channels are closed by their owner)."""
        if self._closed:
            return
        self._closed = True
        os.write(self._wake_w, b"x")
        self._thread.join(5)
        for thread, sock in list(self._admits.items()):  # (their peers' reads end at once)
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            thread.join(5)
        os.write(self._flush_w, b"x")
        self._writer.join(5)
        self._listener.close()
        for fd in (self._wake_r, self._wake_w, self._flush_r, self._flush_w):
            os.close(fd)
