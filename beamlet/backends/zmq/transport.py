"""The cluster's Transport: ZeroMQ over TCP, every message encrypted and
authenticated (AES-256-GCM) with keys derived from the cluster's secret.

One node listens on one TCP port: a ROUTER socket bound to ``tcp://HOST:PORT``.
Every peer (another node, a driver) connects with a DEALER. Addresses are
``"host:port"`` strings (``"[::1]:port"`` for IPv6); port 0 picks a free one.

Authentication, before anything is unpickled
    ZeroMQ's own encryption (CURVE) carries at most about 0.3-1 GB/s per
    connection here, below issue 7's target (see
    benchmarks/transfer_candidates.py): the security is beamlet's, on top,
    in raw frames that are never unpickled. Everything is keyed by
    `ClusterKey` (HMAC-SHA256 of the secret with a label of its own).

    First, at the gate, what a stranger can make a listener hold is bounded:
    the sockets use ZeroMQ's PLAIN mechanism (not encrypting either), whose
    credentials beamlet makes and checks itself. A client's are a fresh
    nonce and its clock's time, with their MAC (`ClusterKey.credentials`);
    the listener's ZAP handler (a socket of the listener's context, answered
    by its loop) accepts them only if the MAC is right, the time within
    `CLOCK_SKEW` of its own clock and the nonce not used before (a recorded
    hello cannot be replayed). ZeroMQ takes no message from a connection
    before its handshake, ZAP included, succeeded, and a listener's socket
    reads no frame over `FRAME_LIMIT` bytes (ZMQ_MAXMSGSIZE, a handshake
    command included): so a peer without the key makes a listener read one
    frame of at most `FRAME_LIMIT` bytes (65 KiB) before it is cut off (with
    ZeroMQ's NULL mechanism a stranger could send one frame of up to the
    message limit, or a message of endless frames, which ZeroMQ holds until
    it is complete). A client cuts larger frames of its messages into parts
    (`_Sealer.seal_parts`); a listener's messages to its clients are not cut
    (a client reads what the listener it chose sends). Refused credentials
    are logged by the ZAP handler (the key is wrong; the clocks differ; a
    replay), a peer of another mechanism (NULL, or CURVE: an older beamlet)
    or one cut off by the frame limit by the socket's monitor, and a client
    whose credentials are refused raises `AuthenticationError` at once.

    Then beamlet's handshake, in frames of the now-accepted connection::

        client -> listener   H  nonce_c, version
        listener -> client   C  nonce_s, MAC("listener" | version | nonce_c | nonce_s)
        client -> listener   R  MAC("client" | version | nonce_s | nonce_c)
        listener -> client   W  version              (or X and the reason, at any step)

    Both nonces are fresh random bytes, so a recorded answer is worth nothing
    on another connection. A listener of another version answers the hello
    with ``X`` naming both versions. A client checks the listener's proof,
    a listener the client's answer (`hmac.compare_digest`): a peer without
    the key is refused (``X``), logged (one line per refusal; repeats of the
    same line within a second are counted, not printed), and what it sends
    next is dropped unread; a client with a wrong key, or facing a listener
    with another, raises `AuthenticationError` at once. Only a welcomed peer
    is `Joined`. The answers come from the listener's loop, so `connect`
    completes only while it runs (`poll` or `accept` in another thread or
    process). A peer speaking another ZeroMQ mechanism (CURVE: an older
    beamlet) fails the ZeroMQ handshake and is logged too.

    Then every message is sealed: each direction of each connection has its
    own AES-256-GCM key (from the secret and both nonces), and frame i of
    the connection's message number n is encrypted under nonce (n, i), with
    the message's frame count as associated data. So a frame that is forged,
    altered, cut short, dropped, moved to another position, message or
    connection, or replayed fails its tag: the receiver closes that
    connection (``Left`` with a `ProtocolError` on a listener; `recv` raises
    it on a client) and nothing of that message is unpickled. Probes and the
    goodbye frames (``B``, ``X``) are not sealed: someone on the path could
    close a connection with one, as it could by resetting the TCP stream,
    but never make a peer accept a message. Not hidden: the sizes and timing
    of messages.

Messages
    A message is one ZeroMQ multipart message: a pickle (protocol 5) and its
    out-of-band buffers, one frame each (with a `codec`, the pickle is of its
    wire form: see ZmqTransport). Out of band go `pickle.PickleBuffer`
    objects, numpy arrays (which pickle through them), and `memoryview`
    objects (they arrive as memoryviews of the same format and
    shape) of at least `OOB_MIN_BYTES`: they are not copied into the pickle,
    and arrive as views of their decrypted frames. ``bytes`` are
    pickled in-band: wrap a large ``bytes`` in a memoryview to send it out of
    band. A message's frames together may hold at most `max_message` bytes
    (`MAX_MESSAGE` by default); a larger one is refused by `send`
    (`ProtocolError`). A listener drops a joined peer that sends a larger
    one, or one that does not unpickle, with ``Left(conn, error)``, and
    serves the others on (ZeroMQ itself cuts off a single frame past
    `FRAME_LIMIT` at its header, before buffering it: that peer is reported
    ``Left`` with ``error`` None).

    Large buffers travel in pieces: `chunks` cuts one into views of at most
    `CHUNK_SIZE` bytes without copying; send each inside a message (e.g.
    ``(object_id, offset, view)``) and write each arriving piece at its
    offset on the other side (e.g. into shared memory); or, from a listener
    to its client, with `PeerConnection.send_piece`, whose data the client
    decrypts straight into place (`Piece.read_into`). Sends never block (no
    high-water mark); TCP paces them. Each frame is encrypted into a new
    buffer when it is sent (so a queued piece costs its size in memory until
    it has left: `send_piece`'s tracker lets a sender bound that) and
    decrypted into another when it arrives (buffers arrive as writable views
    of those, no further copy); pieces of about `CHUNK_SIZE` go fastest (see
    benchmarks/zmq_transport.py).

Liveness
    Both ends run ZMTP heartbeats (`heartbeats` of `dead_after`),
    answered by libzmq's own I/O thread, so a busy Python process is never
    taken for dead. A killed process's connection closes at once (the kernel
    sends FIN); a frozen or unreachable peer's is closed once `DEAD_AFTER`
    seconds passed without traffic from it (at most an interval more: a PING
    goes out at most an interval after the last traffic, and the connection
    closes when no traffic follows it within the timeout, `DEAD_AFTER`), 10 s
    by default, ``BEAMLET_DEAD_AFTER`` in the environment overriding it (see
    `dead_after`). It is that long so that a live process starved of CPU for
    seconds (a loaded machine, a paused VM) is not taken for dead. A socket
    monitor reports each closed connection; as a
    ROUTER does not say which peer a closed connection was, the listener
    then probes its peers (an empty frame each, ``ROUTER_MANDATORY``: a gone
    peer's send fails) until the closed connection is accounted for, and
    also once every `PROBE_INTERVAL`. A gone peer is reported ``Left`` after
    every message it sent. A client that closes says so (``B``) and is
    ``Left`` at once. On the client side, a closed connection makes `recv`
    and `recv_all` raise ``EOFError`` once the messages that arrived before
    are read, and `send` raise ``BackendError``.

Threads
    ZeroMQ sockets are not thread-safe: each socket sits behind a lock, held
    only around socket calls (pickling and unpickling happen outside it).
    `send` may be called from any thread; `poll`/`accept` (listener) and
    `recv`/`recv_all` (connection) from one reader thread. A send can consume
    the wake-up of the socket's file descriptor (ZMQ_FD is edge-like), so
    after each send the sender checks whether messages wait and, if so,
    signals an eventfd; `fileno` is an epoll descriptor that holds the
    sockets' ZMQ_FDs and that eventfd.

Resources
    One ``zmq.Context`` per transport, made when its first listener or
    connection opens and terminated when the last one closes (sockets close
    with at most `CLOSE_LINGER` seconds to flush), so nothing of it (thread,
    descriptor) outlives `close`. pyzmq releases zero-copy frames through a
    helper thread of its own; once no beamlet context is left it is stopped
    too (when it holds nothing).
"""
from __future__ import annotations

import collections
import copyreg
import errno
import hmac
import io
import ipaddress
import os
import pickle
import select
import secrets
import socket
import struct
import sys
import threading
import time

import zmq
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from zmq.utils.monitor import parse_monitor_message

from ... import exceptions as exc
from ...core import auth
from ...core.interfaces import Connection, Joined, Left, Listener, Received, Transport
from ..local.transport import ProtocolError, log_refused

#: The largest message (all its frames) a peer may send, in bytes.
MAX_MESSAGE = 1 << 30
#: The size of the pieces `chunks` cuts a large buffer into.
CHUNK_SIZE = 1 << 20
#: A client cuts each frame of a message larger than this into parts of at most
#: this many bytes (see `_Sealer.seal_parts`)...
PART_SIZE = 64 << 10
#: ... as a listener reads no frame larger than this (its socket's ZMQ_MAXMSGSIZE):
#: all that a peer, before it is authenticated, can make it buffer.
FRAME_LIMIT = PART_SIZE + 1024
#: ZeroMQ credentials (see "Authentication") are good this long either side of
#: the listener's clock (seconds), and remembered twice as long against replays.
CLOCK_SKEW = 300.0
#: How many used credentials a listener remembers at most (the oldest go first).
MAX_CREDENTIALS_SEEN = 1 << 16
#: The largest frame AES-GCM seals here (cryptography's limit is 2**31 - 1 bytes).
MAX_FRAME = (1 << 31) - 1024
#: Freed buffers up to this size stay in the process for reuse, and up to this much
#: free memory (see `_keep_freed_buffers`).
MALLOC_MMAP_MAX = 4 << 20
MALLOC_KEEP = 256 << 20
#: Buffers smaller than this stay inside the pickle (a frame of their own costs more).
OOB_MIN_BYTES = 64 << 10
#: Seconds of silence after which a peer is taken for dead (its connection
#: closed); the environment's ``BEAMLET_DEAD_AFTER`` overrides it (`dead_after`).
#: Ray's GCS, for comparison, declares a raylet dead after 5 failed health
#: checks 3 s apart (each failing after 10 s at most): 15 s and more.
DEAD_AFTER = 10.0
#: ZMTP heartbeats (seconds): a PING every interval; no traffic for the timeout
#: after one closes the connection (so it closes `DEAD_AFTER` to `DEAD_AFTER`
#: + interval seconds after the peer's last traffic).
HEARTBEAT_INTERVAL = 1.0
HEARTBEAT_TIMEOUT = DEAD_AFTER
#: The listener probes its peers at least this often (seconds), and on every
#: poll for `PROBE_WINDOW` seconds after a connection closed.
PROBE_INTERVAL = 1.0
PROBE_WINDOW = 2.0
#: How long closing sockets may take to flush what they still hold (seconds).
CLOSE_LINGER = 1.0
#: Messages `poll` reads at most per call (it asks to be called again for the rest).
MAX_BATCH = 4096
#: How many closed peers' routing ids a listener remembers (see `_newcomer`).
MAX_CLOSED = 4096
#: How many handshakes under way a listener keeps (the oldest is dropped past it).
MAX_HANDSHAKES = 1024
#: How long a client that found the listener's key wrong waits for its refusal (seconds).
REFUSAL_WAIT = 1.0
#: How long a refusal log line suppresses identical ones (seconds).
LOG_REPEAT = 1.0

_PICKLE = 0x80  # the first byte of every pickle of protocol >= 2
_HELLO, _CHALLENGE, _RESPONSE, _WELCOME = b"H", b"C", b"R", b"W"
_BYE, _CLOSE, _SEALED, _PIECE, _PARTS = b"X", b"B", b"S", b"P", b"T"
_SEALED_LEAD, _PARTS_LEAD, _PIECE_LEAD, _BYE_LEAD = _SEALED[0], _PARTS[0], _PIECE[0], _BYE[0]
_ZAP_DOMAIN = b"beamlet"
_ZAP_ENDPOINT = "inproc://zeromq.zap.01"
_CREDENTIAL = struct.Struct(">16sd")  # a fresh nonce, the client's clock (time.time())
_PART_HEAD = struct.Struct("<QI")  # (split messages) a frame's size, how many parts
_PROBE = b""
# (Plain ints: an enum operand makes pyzmq build an enum member per call.)
_POLLIN = int(zmq.POLLIN)
_EVENTS = int(zmq.EVENTS)
_NOBLOCK = int(zmq.NOBLOCK)
_NOBLOCK_MORE = int(zmq.NOBLOCK) | int(zmq.SNDMORE)
_MONITORED = (zmq.EVENT_ACCEPTED | zmq.EVENT_CONNECTED | zmq.EVENT_CONNECT_RETRIED
              | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
              | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
              | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


# -- liveness ----------------------------------------------------------------------------
def dead_after() -> float:
    """`DEAD_AFTER`, or ``BEAMLET_DEAD_AFTER`` (seconds, from 0.5 to 3600) if
    set; ValueError naming the variable otherwise. Every process of a cluster
    should see the same value (a peer's heartbeats tell us its own as TTL:
    libzmq closes a connection at the shorter of the two)."""
    value = os.environ.get("BEAMLET_DEAD_AFTER")
    if value is None:
        return DEAD_AFTER
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0.5 <= seconds <= 3600:
        raise ValueError(f"BEAMLET_DEAD_AFTER must be a number of seconds from 0.5 to 3600, "
                         f"got {value!r}")
    return seconds


def heartbeats(silence: float) -> tuple[float, float]:
    """The ZMTP heartbeats' (interval, timeout) that close a connection once
    `silence` seconds passed without traffic (at most an interval more): a
    PING every `HEARTBEAT_INTERVAL` (a tenth of `silence` if that is
    shorter), and `silence` the timeout."""
    interval = min(HEARTBEAT_INTERVAL, silence / 10)
    return interval, silence


# -- addresses and keys ------------------------------------------------------------------
def parse_address(address, listening: bool = False) -> tuple[str, int]:
    """``"host:port"`` -> (host, port); ValueError naming the problem. `listening`
    allows port 0 (any free port) and None (``127.0.0.1`` on a free port)."""
    if address is None and listening:
        return "127.0.0.1", 0
    example = "'127.0.0.1:6380'" + (" (port 0: any free port)" if listening else "")
    if not isinstance(address, str):
        raise ValueError(f"a ZeroMQ address is a 'host:port' string such as {example}, "
                         f"got {address!r}")
    host, sep, port_text = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{address!r}: {host!r} is not an IPv6 address") from None
    if not sep or not host or any(c in host for c in " /[]") or \
            (":" in host and not address.startswith("[")):
        raise ValueError(f"a ZeroMQ address is 'host:port' (IPv6: '[addr]:port') such as "
                         f"{example}, got {address!r}")
    if not port_text.isdigit() or not (0 if listening else 1) <= int(port_text) <= 65535:
        raise ValueError(f"{address!r}: the port must be a number from "
                         f"{0 if listening else 1} to 65535, got {port_text!r}")
    return host, int(port_text)


def _endpoint(host: str, port) -> str:
    host = f"[{host}]" if ":" in host else host
    return f"tcp://{host}:{port}"


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine's loopback interface only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ClusterKey:
    """The transport's keys, all derived from the cluster's secret (and
    distinct from every other use of it): `mac` proves, in the handshake,
    that a side holds the secret; `session` gives a connection's two AES-256
    keys (one per direction) from the handshake's two fresh nonces."""

    __slots__ = ("_key",)

    def __init__(self, secret: bytes):
        auth.check_secret(secret)
        self._key = hmac.digest(secret, b"beamlet zmq transport\0handshake", "sha256")

    def mac(self, label: bytes, version: bytes, first: bytes, second: bytes) -> bytes:
        return hmac.digest(self._key, label + b"\0" + version + b"\0" + first + second,
                           "sha256")

    def credentials(self) -> tuple[bytes, bytes]:
        """Fresh ZeroMQ PLAIN credentials for one connection: (a nonce and the
        time, their MAC)."""
        name = _CREDENTIAL.pack(secrets.token_bytes(16), time.time())
        return name, self.mac(b"zeromq plain", b"", name, b"")

    def check_credentials(self, name: bytes, password: bytes) -> bool:
        return len(name) == _CREDENTIAL.size and hmac.compare_digest(
            password, self.mac(b"zeromq plain", b"", name, b""))

    def session(self, version: bytes, nonce_c: bytes, nonce_s: bytes) -> tuple[bytes, bytes]:
        """(client -> listener key, listener -> client key)."""
        prk = self.mac(b"session", version, nonce_c, nonce_s)
        return (hmac.digest(prk, b"client to listener", "sha256"),
                hmac.digest(prk, b"listener to client", "sha256"))


_NONCE = struct.Struct("<QI")  # a message's number on its connection, a frame's index
_FRAMES = struct.Struct("<I")  # (associated data) how many frames the message has
_TAG = 16
_ONE_FRAME = _FRAMES.pack(1)


class _Sealer:
    """Encrypts and authenticates one direction of one connection: message
    number n (counted from 0) has its frame i sealed with AES-256-GCM under
    nonce (n, i) and the frame count as associated data. Hold `lock` around
    `seal` and the send of its frames, so that they go in number order."""

    __slots__ = ("_encrypt", "_seq", "lock")

    def __init__(self, key: bytes):
        self._encrypt = AESGCM(key).encrypt
        self._seq = 0
        self.lock = threading.Lock()

    def seal_one(self, frame) -> bytes:
        """The one frame of a sealed message of one frame (`seal`'s, unlisted)."""
        seq = self._seq
        self._seq = seq + 1
        return _SEALED + self._encrypt(_NONCE.pack(seq, 0), frame, _ONE_FRAME)

    def seal(self, frames: list, mark: bytes = _SEALED) -> list:
        if len(frames) == 1 and mark is _SEALED:  # (most messages)
            return [self.seal_one(frames[0])]
        seq = self._seq
        self._seq = seq + 1
        if len(frames) == 1:
            return [mark + self._encrypt(_NONCE.pack(seq, 0), frames[0], _ONE_FRAME)]
        count = _FRAMES.pack(len(frames))
        encrypt = self._encrypt
        out = [mark + encrypt(_NONCE.pack(seq, 0), frames[0], count)]
        for i in range(1, len(frames)):
            out.append(encrypt(_NONCE.pack(seq, i), frames[i], count))
        return out

    def seal_parts(self, frames: list, part: int = PART_SIZE) -> list:
        """`seal`, with no frame sent larger than `part` bytes (plus its tag):
        a message with a larger frame goes split (mark ``T``), each frame as
        a small one saying its size and how many parts follow, then those
        parts; all sealed as one message (each frame under its own nonce, the
        count of all as associated data). `_Opener.open_parts` puts it back."""
        if len(frames) == 1:  # (a pickle: bytes)
            if len(frames[0]) <= part:
                return self.seal(frames)
        elif all(memoryview(f).nbytes <= part for f in frames):
            return self.seal(frames)
        pieces: list = []
        for frame in frames:
            view = memoryview(frame).cast("B")
            n = view.nbytes
            pieces.append(_PART_HEAD.pack(n, -(-n // part)))
            pieces.extend(view[offset:offset + part] for offset in range(0, n, part))
        return self.seal(pieces, _PARTS)


def _unauthentic(seq: int) -> ProtocolError:
    """The error for sealed message `seq` that fails authentication."""
    return ProtocolError(f"message {seq} does not authenticate with this connection's key "
                         f"(forged, altered, cut, reordered or replayed): nothing of it was "
                         f"unpickled")


def _decoded(message, decode):
    """`message` passed through the transport's codec's `decode` (if any);
    ProtocolError if it is not one of the protocol's messages."""
    if decode is None:
        return message
    try:
        return decode(message)
    except Exception as err:  # noqa: BLE001 - as garbage that does not unpickle
        raise ProtocolError(f"a message that is not one of the protocol's: {err}") from None


class _Opener:
    """The receiving side of a `_Sealer`: opens the messages in order. A frame
    that was forged, altered, cut, moved to another message or position, or
    replayed (from this connection or another) fails, and `open` raises
    ProtocolError before anything of the message is used."""

    __slots__ = ("_aead", "_into", "_seq")

    def __init__(self, key: bytes):
        self._aead = AESGCM(key)
        self._into = getattr(self._aead, "decrypt_into", None)  # (cryptography >= 47)
        self._seq = 0

    def open(self, frames: list, max_message: int, count: int | None = None) -> list:
        """The plaintexts of a sealed message's frames (zmq Frames or
        bytes-likes; the first starts with the sealed mark): writable
        bytearrays, so that buffers unpickled from them are writable too.
        (`count`: the message's frames, if only the first of them are given.)"""
        views = [f.buffer if isinstance(f, zmq.Frame) else memoryview(f) for f in frames]
        views[0] = views[0][1:]
        size = sum(v.nbytes for v in views) - _TAG * len(views)
        if size > max_message:
            raise ProtocolError(f"a message of {size} bytes (at most {max_message} are allowed)")
        seq = self._seq
        count = _FRAMES.pack(len(views) if count is None else count)
        out = []
        try:
            for i, view in enumerate(views):
                if view.nbytes < _TAG:
                    raise InvalidTag
                if self._into is not None:
                    plain = bytearray(view.nbytes - _TAG)
                    self._into(_NONCE.pack(seq, i), view, count, plain)
                else:
                    plain = bytearray(self._aead.decrypt(_NONCE.pack(seq, i), view, count))
                out.append(plain)
        except InvalidTag:
            raise _unauthentic(seq) from None
        self._seq = seq + 1
        return out

    def message(self, frames: list, max_message: int, decode=None):
        """The message a sealed message's frames hold: ``unpack(open(frames))``
        passed through `decode` (the transport's codec's). ProtocolError as
        there, or if `decode` raises."""
        if len(frames) == 1:
            return self.message_one(frames[0], max_message, decode)
        return _decoded(unpack(self.open(frames, max_message), max_message), decode)

    def message_one(self, frame, max_message: int, decode=None):
        """`message` of a sealed message of one frame (most are), in fewer steps."""
        if self._into is None:
            return _decoded(unpack(self.open([frame], max_message), max_message), decode)
        plain = self._open_one(frame, max_message)
        if not plain or plain[0] != _PICKLE:
            raise ProtocolError("a frame that is not a message (not a pickle)")
        try:
            message = pickle.loads(plain)
        except Exception as err:  # noqa: BLE001 - any garbage from the peer is its protocol error
            raise ProtocolError(f"a message of {len(plain)} bytes does not unpickle: "
                                f"{err!r}") from None
        return message if decode is None else _decoded(message, decode)

    def _open_one(self, frame, max_message: int) -> bytearray:
        """`open` of a message of one frame (most are), in fewer steps."""
        view = (frame.buffer if isinstance(frame, zmq.Frame) else memoryview(frame))[1:]
        size = view.nbytes - _TAG
        if size > max_message:
            raise ProtocolError(f"a message of {size} bytes (at most {max_message} are allowed)")
        seq = self._seq
        try:
            if size < 0:
                raise InvalidTag
            plain = bytearray(size)
            self._into(_NONCE.pack(seq, 0), view, _ONE_FRAME, plain)
        except InvalidTag:
            raise _unauthentic(seq) from None
        self._seq = seq + 1
        return plain

    def open_parts(self, frames: list, max_message: int) -> list:
        """The frames of a split message (see `_Sealer.seal_parts`), each put
        back together into a writable bytearray, decrypted into place;
        ProtocolError as `open`, or if the parts do not add up."""
        views = [f.buffer if isinstance(f, zmq.Frame) else memoryview(f) for f in frames]
        views[0] = views[0][1:]
        seq = self._seq
        count = _FRAMES.pack(len(views))
        aead, into = self._aead, self._into
        out: list = []
        total = 0
        i = 0
        try:
            while i < len(views):
                head = aead.decrypt(_NONCE.pack(seq, i), views[i], count)
                if len(head) != _PART_HEAD.size:
                    raise ProtocolError("a split message's frame head is malformed")
                size, parts = _PART_HEAD.unpack(head)
                total += size
                if total > max_message:
                    raise ProtocolError(f"a message of over {total} bytes (at most "
                                        f"{max_message} are allowed)")
                if i + 1 + parts > len(views):
                    raise ProtocolError("a split message has fewer parts than it says")
                plain = bytearray(size)
                target = memoryview(plain)
                offset = 0
                for i in range(i + 1, i + 1 + parts):
                    n = views[i].nbytes - _TAG
                    if n < 0 or offset + n > size:
                        raise ProtocolError("a split message's parts overrun their frame")
                    if into is not None:
                        into(_NONCE.pack(seq, i), views[i], count, target[offset:offset + n])
                    else:
                        target[offset:offset + n] = aead.decrypt(_NONCE.pack(seq, i), views[i],
                                                                 count)
                    offset += n
                if offset != size:
                    raise ProtocolError("a split message's parts fall short of their frame")
                out.append(plain)
                i += 1
        except InvalidTag:
            raise _unauthentic(seq) from None
        if not out:
            raise ProtocolError("an empty split message")
        self._seq = seq + 1
        return out

    def open_piece(self, frames: list, max_message: int, broken) -> "Piece":
        """A sealed piece (see `PeerConnection.send_piece`): its header frame is
        opened and unpickled here, its data only by `Piece.read_into`."""
        if len(frames) != 2:
            raise ProtocolError(f"a piece of {len(frames)} frames (a piece has two)")
        header = unpack(self.open(frames[:1], max_message, count=2), max_message)
        frame = frames[1]
        view = frame.buffer if isinstance(frame, zmq.Frame) else memoryview(frame)
        if not _TAG <= view.nbytes <= max_message + _TAG:
            raise ProtocolError(f"a piece of {view.nbytes} bytes")
        return Piece(header, view, _NONCE.pack(self._seq - 1, 1), self, broken)

    def read_into(self, nonce: bytes, ciphertext, target) -> None:
        try:
            if self._into is not None:
                self._into(nonce, ciphertext, _FRAMES.pack(2), target)
            else:
                target[:] = self._aead.decrypt(nonce, ciphertext, _FRAMES.pack(2))
        except InvalidTag:
            raise ProtocolError("a piece does not authenticate with its connection's key "
                                "(forged, altered, cut, reordered or replayed)") from None


class Piece:
    """A large buffer that came sealed apart from its `header` (the message
    sent with it, already authenticated and unpickled): `nbytes` bytes that
    `read_into` decrypts straight into where they belong (e.g. a segment of
    shared memory), checking them as it goes.

    If they do not authenticate, `read_into` raises `ProtocolError` (what it
    wrote into the target is garbage: drop it, never use it) and the
    connection is closed (its `recv` ends with EOFError): a connection that
    carried one forged byte is not trusted again."""

    __slots__ = ("header", "nbytes", "_data", "_nonce", "_opener", "_broken")

    def __init__(self, header, data: memoryview, nonce: bytes, opener: _Opener, broken):
        self.header = header
        self.nbytes = data.nbytes - _TAG
        self._data = data
        self._nonce = nonce
        self._opener = opener
        self._broken = broken

    def __repr__(self) -> str:
        return f"<Piece of {self.nbytes} bytes with {type(self.header).__name__}>"

    def read_into(self, target) -> None:
        """Decrypt into `target` (a writable buffer of exactly `nbytes` bytes)."""
        view = memoryview(target)
        if view.nbytes != self.nbytes or view.readonly:
            raise ValueError(f"a piece of {self.nbytes} bytes needs a writable target of that "
                             f"size, got {view.nbytes} bytes{' (read-only)' if view.readonly else ''}")
        try:
            self._opener.read_into(self._nonce, self._data, view)
        except ProtocolError as err:
            self._broken(err)
            raise


# -- messages ----------------------------------------------------------------------------
def _restore_view(buffer, fmt: str, shape: tuple):
    view = memoryview(buffer)
    return view if (fmt, shape) == ("B", (view.nbytes,)) else view.cast("B").cast(fmt, shape)


def _reduce_memoryview(view: memoryview):
    return _restore_view, (pickle.PickleBuffer(view), view.format, view.shape)


class _Pickler(pickle.Pickler):
    dispatch_table = collections.ChainMap({memoryview: _reduce_memoryview},
                                          copyreg.dispatch_table)


def pack(message, max_message: int = MAX_MESSAGE) -> list:
    """The frames of `message`: its pickle, then its out-of-band buffers.
    `ProtocolError` if they hold more than `max_message` bytes."""
    buffers: list = []

    def out_of_band(buf: pickle.PickleBuffer) -> bool:
        view = buf.raw()
        if view.nbytes < OOB_MIN_BYTES:
            return True  # in-band
        buffers.append(view)
        return False

    try:
        data = pickle.dumps(message, 5, buffer_callback=out_of_band)
    except TypeError as err:
        if "memoryview" not in str(err):
            raise TypeError(f"this message cannot be sent: {err}") from err
        # memoryviews: the (slower) pickler that sends them out of band
        buffers.clear()
        out = io.BytesIO()
        try:
            _Pickler(out, 5, buffer_callback=out_of_band).dump(message)
        except (pickle.PicklingError, TypeError, ValueError, AttributeError) as err2:
            raise TypeError(f"this message cannot be sent: {err2}") from err2
        data = out.getvalue()
    except (pickle.PicklingError, ValueError, AttributeError) as err:
        raise TypeError(f"this message cannot be sent: {err}") from err
    if not buffers:  # (one frame: sent by copy, cheaper than a zero-copy frame's upkeep)
        if len(data) > max_message:
            raise _too_large(len(data), max_message)
        return [data]
    size = len(data) + sum(v.nbytes for v in buffers)
    if size > max_message:
        raise _too_large(size, max_message)
    return [data, *buffers]


def _too_large(size: int, limit: int) -> ProtocolError:
    return ProtocolError(f"a message of {size} bytes cannot be sent: at most {limit} bytes "
                         f"(send large buffers in pieces: chunks())")


def unpack(frames, max_message: int = MAX_MESSAGE):
    """The message in `frames` (zmq Frames or bytes-like; buffers arrive as views
    of them). `ProtocolError` if it is too large or does not unpickle."""
    if len(frames) == 1:
        frame = frames[0]
        size = len(frame)
        data = (frame.bytes if size < OOB_MIN_BYTES else frame.buffer) \
            if isinstance(frame, zmq.Frame) else frame
        buffers: list = []
    else:
        views = [f.buffer if isinstance(f, zmq.Frame) else memoryview(f) for f in frames]
        size = sum(v.nbytes for v in views)
        data, buffers = views[0], views[1:]
    if size > max_message:
        raise ProtocolError(f"a message of {size} bytes (at most {max_message} are allowed)")
    if not size or data[0] != _PICKLE:
        raise ProtocolError("a frame that is not a message (not a pickle)")
    try:
        return pickle.loads(data, buffers=buffers)
    except Exception as err:  # noqa: BLE001 - any garbage from the peer is its protocol error
        raise ProtocolError(f"a message of {size} bytes does not unpickle: {err!r}") from None


def _recv_frames(sock: zmq.Socket) -> list:
    """``sock.recv_multipart(zmq.NOBLOCK, copy=False)`` on the hot path: each
    Frame says whether more follow, where pyzmq asks the socket (an option
    lookup through an enum) per part. zmq.Again if nothing waits."""
    frame = sock.recv(_NOBLOCK, copy=False)
    frames = [frame]
    while frame.more:
        frame = sock.recv(_NOBLOCK, copy=False)
        frames.append(frame)
    return frames


def _recv_waiting(sock: zmq.Socket, batch: list) -> bool:
    """Append the messages waiting on `sock` to `batch` (each its list of
    Frames), up to `MAX_BATCH` in it; whether it stopped there (more may
    wait). After each message it asks the socket whether another waits
    (ZMQ_EVENTS) rather than trying a recv that fails: pyzmq builds a
    zmq.Again for that, costlier than the question (and usually one message
    waits)."""
    while True:
        if len(batch) >= MAX_BATCH:
            return True
        try:
            batch.append(_recv_frames(sock))
        except zmq.Again:
            return False
        if not _get(sock, _EVENTS) & _POLLIN:
            return False


#: pyzmq's socket methods without its Python wrappers (whose send checks
#: arguments we never pass, and whose getsockopt looks the option up as an enum).
_send = zmq.backend.Socket.send
_get = zmq.backend.Socket.get


def _send_frames(sock: zmq.Socket, frames: list, copy: bool) -> None:
    """``sock.send_multipart(frames, zmq.NOBLOCK, copy=copy)`` with plain int
    flags (pyzmq's ORs an enum per part)."""
    last = frames[-1]
    for frame in frames[:-1]:
        sock.send(frame, _NOBLOCK_MORE, copy=copy)
    sock.send(last, _NOBLOCK, copy=copy)


def chunks(buffer, chunk_size: int = CHUNK_SIZE):
    """Yield ``(offset, view)``: `buffer` (any contiguous buffer) in pieces of at
    most `chunk_size` bytes, as read-only byte views (no copy)."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    view = memoryview(buffer).cast("B").toreadonly()
    for offset in range(0, view.nbytes, chunk_size):
        yield offset, view[offset:offset + chunk_size]


# -- shared machinery --------------------------------------------------------------------
class _Waker:
    """One descriptor for a selector: an epoll set holding ZeroMQ sockets'
    ZMQ_FDs and an eventfd that `wake` makes readable.

    A ZMQ_FD is edge-like: it becomes readable when the socket's state may
    have changed (a message arrived on an idle socket), and stays quiet while
    messages wait unread. So a reader drains a socket whenever its fd is
    ready, and whoever else touches the socket (a send in another thread)
    calls `wake` if it leaves messages waiting."""

    def __init__(self):
        self._ep = select.epoll()
        self.event_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ep.register(self.event_fd, select.EPOLLIN)

    def add(self, sock: zmq.Socket) -> int:
        """Watch `sock`; its ZMQ_FD."""
        fd = sock.getsockopt(zmq.FD)
        self._ep.register(fd, select.EPOLLIN)
        return fd

    def fileno(self) -> int:
        return self._ep.fileno()

    def wake(self) -> None:
        try:
            os.eventfd_write(self.event_fd, 1)
        except OSError:
            pass  # closed

    def ready(self, timeout: float = 0) -> set:
        """The descriptors readable now (or within `timeout` seconds, if none
        is); a wake-up is taken (cleared) here."""
        try:
            fds = {fd for fd, _ in self._ep.poll(timeout)}
        except InterruptedError:
            return set()
        if self.event_fd in fds:
            try:
                os.eventfd_read(self.event_fd)
            except OSError:
                pass
        return fds

    def wait(self, timeout: float | None) -> bool:
        """Whether something became readable within `timeout` seconds."""
        try:
            return bool(self._ep.poll(-1 if timeout is None else max(0.0, timeout), 1))
        except InterruptedError:
            return True

    @property
    def closed(self) -> bool:
        return self._ep.closed

    def close(self) -> None:
        self._ep.close()
        os.close(self.event_fd)


class _RefusalLog:
    """`log_refused` that prints the same reason for the same host at most once
    per `LOG_REPEAT` seconds (a peer that retries must not flood the log)."""

    def __init__(self):
        self._last: dict[str, list] = {}

    def __call__(self, peer: str, reason: str) -> None:
        key = f"{peer.rpartition(':')[0] or peer}\0{reason}"  # (a retrying peer changes port)
        now = time.monotonic()
        entry = self._last.get(key)
        if entry is not None and now - entry[0] < LOG_REPEAT:
            entry[1] += 1
            return
        repeats = entry[1] if entry is not None else 0
        if len(self._last) > 1000:
            self._last.clear()
        self._last[key] = [now, 0]
        more = f" (and {repeats} more times since the last such line)" if repeats else ""
        log_refused(peer, auth.AuthenticationError(reason + more))


def _peer_of_fd(fd: int) -> str:
    """'host:port' of the TCP peer on descriptor `fd`, for logs (best effort: a
    peer refused at once may be gone before the listener reads its fd)."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return "an unknown address"
    try:
        host, port = sock.getpeername()[:2]
        return f"{host}:{port}"
    except (OSError, ValueError, TypeError):
        return "an unknown address"
    finally:
        sock.close()


def _handshake_failure(event: int, value: int) -> str:
    """Why a ZeroMQ (ZMTP) handshake failed, from a monitor event: the peer is
    not a beamlet peer of this transport (beamlet's own handshake comes after)."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            return ("it does not speak this transport (another ZeroMQ security mechanism: "
                    "none, or CURVE: a beamlet of an older version?)")
        return f"it broke the ZeroMQ handshake (protocol error {value:#x})"
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return f"its ZeroMQ handshake was refused (status {value})"
    return (f"the connection closed during the ZeroMQ handshake "
            f"({os.strerror(value) if value else 'no detail'})")


_malloc_tuned = False


def _keep_freed_buffers() -> None:
    """Make glibc's malloc keep freed buffers of up to `MALLOC_MMAP_MAX` bytes
    (and up to `MALLOC_KEEP` bytes of free memory) for reuse, once per process.

    Every piece in flight is a buffer of its own (its ciphertext on the way
    out, libzmq's on the way in). By default glibc may hand such buffers back
    to the kernel when they are freed, and the next ones are fresh pages:
    a page fault each, which on this project's VMs cost more than the
    transfer itself (touching fresh memory ~1.5-2.7 s per GB against ~0.1
    for memory in use; benchmarks/README.md). These are glibc's own tunables
    (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, which it adapts
    by itself within the same range); set in the environment they win."""
    global _malloc_tuned
    if _malloc_tuned:
        return
    _malloc_tuned = True
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return
    try:
        import ctypes
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return  # not glibc
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, MALLOC_MMAP_MAX)
    mallopt(m_trim_threshold, MALLOC_KEEP)


_live_contexts = 0
_live_lock = threading.Lock()


def _context_ended() -> None:
    """The last beamlet context is gone: stop pyzmq's zero-copy helper thread,
    if it holds nothing (its frames are freed by then; give its thread a moment
    to take the notices)."""
    from zmq.utils import garbage

    gc = garbage.gc
    if not gc.is_alive():
        return
    until = time.monotonic() + 1.0
    while gc.refs and time.monotonic() < until:
        time.sleep(0.001)
    with _live_lock:
        if _live_contexts == 0 and not gc.refs and gc.is_alive():
            gc.stop()


# -- client side -------------------------------------------------------------------------
class ZmqConnection(Connection):
    """A connection to a `ZmqListener` (a DEALER socket), made by
    `ZmqTransport.connect`. `send` from any thread; `recv`/`recv_all` from one."""

    def __init__(self, transport: "ZmqTransport", address: str, timeout: float | None):
        host, port = parse_address(address)
        self.address = address
        self._endpoint = _endpoint(host, port)
        self._transport = transport
        self._max = transport.max_message
        self._encode, self._decode = transport.encode, transport.decode
        self._lock = threading.Lock()
        self._pending: collections.deque = collections.deque()
        self._gone: str | None = None  # why the peer is gone, once it is
        self._error: ProtocolError | None = None  # raised by the next recv_all
        self._sealer: _Sealer | None = None  # (set by the handshake)
        self._opener: _Opener | None = None
        #: Whether the next `recv_all` reads the monitor whatever is ready: a
        #: wake-up of the waker is otherwise only for the DEALER (see `send`).
        self._look_all = False
        self._ready: set | None = None  # (what `wait` found, for the next recv_all)
        self.closed = False
        ctx = transport._acquire(self)
        try:
            sock = self._sock = ctx.socket(zmq.DEALER)
            transport._tune(sock)
            name, password = transport.keys.credentials()
            sock.setsockopt(zmq.PLAIN_USERNAME, name)
            sock.setsockopt(zmq.PLAIN_PASSWORD, password)
            sock.setsockopt(zmq.IMMEDIATE, 1)  # no queue before (or after) a live connection
            if ":" in host:
                sock.setsockopt(zmq.IPV6, 1)
            self._monitor = sock.get_monitor_socket(_MONITORED)
            self._waker = _Waker()
            self._sock_fd = self._waker.add(sock)
            self._monitor_fd = self._waker.add(self._monitor)
        except BaseException:
            self._release_sockets()
            raise
        try:
            self._join(timeout)
        except BaseException:
            self.close(linger=0)
            raise

    # -- the handshake
    def _join(self, timeout: float | None) -> None:
        until = None if timeout is None else time.monotonic() + timeout
        self._sock.connect(self._endpoint)
        connected = False
        while True:
            event = self._next_event(until)
            if event is None:
                if connected:
                    raise auth.AuthenticationError(
                        f"the listener at {self.address} did not complete the ZeroMQ handshake "
                        f"within {timeout}s")
                raise exc.BackendError(f"nothing answered at {self.address} within {timeout}s: "
                                       f"is a beamlet listener running there?")
            kind, value = event["event"], event["value"]
            if kind == zmq.EVENT_CONNECTED:
                connected = True
            elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                break
            elif kind & (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                         | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL) or \
                    (kind == zmq.EVENT_DISCONNECTED and connected):
                raise auth.AuthenticationError(self._refusal(kind, value))
        version = auth.check_version(self._transport.version)
        keys = self._transport.keys
        nonce_c = secrets.token_bytes(auth.NONCE_BYTES)
        self._raw_send(_HELLO + nonce_c + version)
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        frame = self._answer(poller, until, timeout)
        if frame[:1] != _CHALLENGE or len(frame) != 1 + auth.NONCE_BYTES + auth.MAC_BYTES:
            raise auth.AuthenticationError(f"the listener at {self.address} did not answer our "
                                           f"hello as a beamlet listener: {frame[:80]!r}")
        nonce_s, proof = frame[1:1 + auth.NONCE_BYTES], frame[1 + auth.NONCE_BYTES:]
        # (answered before the listener's proof is checked, so that a listener with
        # another key logs this peer's refusal; the answer is worth nothing elsewhere)
        self._raw_send(_RESPONSE + keys.mac(b"client", version, nonce_s, nonce_c))
        if not hmac.compare_digest(proof, keys.mac(b"listener", version, nonce_c, nonce_s)):
            try:  # its refusal: it has our answer (and logged us) before we close
                self._answer(poller, time.monotonic() + REFUSAL_WAIT, REFUSAL_WAIT)
            except exc.BackendError:
                pass
            raise auth.AuthenticationError(
                f"the listener at {self.address} refused the connection: it and this process "
                f"hold different cluster keys (was a wrong token given?)")
        frame = self._answer(poller, until, timeout)
        if frame[:1] != _WELCOME or frame[1:] != version:
            raise auth.AuthenticationError(f"the listener at {self.address} did not welcome "
                                           f"us as a beamlet listener: {frame[:80]!r}")
        up, down = keys.session(version, nonce_c, nonce_s)
        self._sealer, self._opener = _Sealer(up), _Opener(down)
        # (polling here took the sockets' wake-ups: the first recv_all must look)
        self._look_all = True
        self._waker.wake()

    def _raw_send(self, frame: bytes) -> None:
        try:
            self._sock.send(frame, zmq.NOBLOCK)
        except zmq.ZMQError as err:
            raise exc.BackendError(f"the connection to {self.address} closed at once: "
                                   f"{err}") from None

    def _answer(self, poller, until: float | None, timeout) -> bytes:
        """The listener's next handshake frame; AuthenticationError if it is a
        refusal (with its reason), BackendError if none comes in time."""
        while True:
            left = None if until is None else until - time.monotonic()
            ready = dict(poller.poll(None if left is None else max(0, int(left * 1000)))) \
                if left is None or left > 0 else {}
            if not ready:
                raise exc.BackendError(f"the listener at {self.address} did not answer our "
                                       f"handshake within {timeout}s")
            if self._monitor in ready:
                self._read_monitor()
                if self._gone is not None:
                    raise exc.BackendError(f"the listener at {self.address} closed the "
                                           f"connection during our handshake")
            if self._sock not in ready:
                continue
            try:
                frame = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                continue
            if frame == _PROBE:
                continue
            if frame[:1] == _BYE:
                raise auth.AuthenticationError(f"the listener at {self.address} refused the "
                                               f"connection: {frame[1:].decode(errors='replace')}")
            return frame

    def _next_event(self, until: float | None) -> dict | None:
        left = None if until is None else until - time.monotonic()
        if left is not None and left <= 0:
            return None
        if not self._monitor.poll(None if left is None else max(1, int(left * 1000))):
            return None
        return parse_monitor_message(self._monitor.recv_multipart())

    def _refusal(self, kind: int, value: int) -> str:
        if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return (f"the listener at {self.address} refused the connection: it and this "
                    f"process hold different cluster keys (was a wrong token given?), or the "
                    f"clocks of the two machines differ by more than {CLOCK_SKEW:.0f} s")
        if kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            return (f"the ZeroMQ handshake with {self.address} failed: "
                    + _handshake_failure(kind, value).replace("it ", "the listener ", 1))
        return (f"the listener at {self.address} closed the connection during the ZeroMQ "
                f"handshake: it is not a beamlet listener of this version")

    # -- messages
    def fileno(self) -> int:
        return self._waker.fileno()

    def send(self, message) -> None:
        frames = pack(message if self._encode is None else self._encode(message), self._max)
        sealer = self._sealer
        with sealer.lock:  # (sealed and sent in number order; the socket's lock is shorter)
            if self.closed:
                raise exc.BackendError(f"this connection to {self.address} is closed")
            if len(frames) == 1 and len(frames[0]) <= PART_SIZE:  # (most messages)
                sealed = sealer.seal_one(frames[0])
            else:
                sealed = sealer.seal_parts(frames)
            with self._lock:
                if self.closed:
                    raise exc.BackendError(f"this connection to {self.address} is closed")
                if self._gone is not None:
                    raise exc.BackendError(f"the peer at {self.address} is gone: {self._gone}")
                sock = self._sock
                try:
                    if type(sealed) is bytes:
                        _send(sock, sealed, _NOBLOCK)
                    else:
                        _send_frames(sock, sealed, False)
                except zmq.Again:
                    raise exc.BackendError(f"the peer at {self.address} is gone (no "
                                           f"connection to send on)") from None
                except zmq.ZMQError as err:
                    raise exc.BackendError(f"cannot send to {self.address}: {err}") from None
                if _get(sock, _EVENTS) & _POLLIN:
                    self._waker.wake()

    def _read_monitor(self) -> None:
        """Note a closed connection (under the lock)."""
        while self._gone is None:
            try:
                event = parse_monitor_message(self._monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self._set_gone("the connection closed (the listener closed it, died, or "
                               "stopped answering heartbeats)")

    def _set_gone(self, reason: str) -> None:
        if self._gone is None:
            self._gone = reason
            try:
                self._sock.disconnect(self._endpoint)  # no reconnecting
            except zmq.ZMQError:
                pass

    def recv_all(self) -> list:
        """Every message that has arrived (possibly none), without blocking;
        EOFError once the connection closed and nothing is left."""
        if self._pending:
            out = list(self._pending)
            self._pending.clear()
            return out
        if self._error is not None:
            raise self._error
        if self.closed:
            raise EOFError(f"this connection to {self.address} is closed")
        ready = self._ready
        if ready is None:
            ready = self._waker.ready()
        else:
            self._ready = None
        batch = []
        if ready:
            woken = self._waker.event_fd in ready  # (a sender saw messages waiting)
            with self._lock:
                # The monitor first: every message that came before the connection
                # closed is in the socket once its DISCONNECTED event is out. (Only
                # when its descriptor says so: no other thread touches it, and a
                # try on an empty socket costs pyzmq an exception.)
                if self._monitor_fd in ready or self._look_all:
                    self._look_all = False
                    self._read_monitor()
                drain = woken or self._sock_fd in ready or self._gone is not None
                if drain and _recv_waiting(self._sock, batch):
                    self._waker.wake()  # the rest at the next call
        out = []
        for frames in batch:
            if len(frames[0]) == 0:
                continue  # a liveness probe
            lead = frames[0].buffer[0]
            if lead == _BYE_LEAD:
                with self._lock:
                    self._set_gone("the listener closed this connection: "
                                   + frames[0].bytes[1:].decode(errors="replace"))
                break
            try:
                if lead == _SEALED_LEAD:
                    if len(frames) == 1:  # (most messages)
                        out.append(self._opener.message_one(frames[0], self._max,
                                                            self._decode))
                    else:
                        out.append(self._opener.message(frames, self._max, self._decode))
                elif lead == _PIECE_LEAD:
                    out.append(self._opener.open_piece(frames, self._max, self._piece_broken))
                else:
                    raise ProtocolError(f"a frame that is not a sealed message: "
                                        f"{bytes(frames[0].buffer[:40])!r}")
            except ProtocolError as err:
                with self._lock:
                    self._set_gone(f"the listener sent a broken message: {err}")
                if not out:
                    raise
                self._error = err
                break
        if not out and self._gone is not None:
            raise EOFError(f"the connection to {self.address} is closed: {self._gone}")
        return out

    def _piece_broken(self, error: ProtocolError) -> None:
        with self._lock:
            self._set_gone(f"the listener sent a broken piece: {error}")

    def wait(self, timeout: float | None) -> bool:
        """(The reader's thread.) Wait up to `timeout` seconds (None: no limit)
        until `recv_all` may have something; whether it may. As a wait on
        `fileno`, without that descriptor's own wake-up and the second look
        `recv_all` would then take."""
        if self._pending or self._error is not None or self.closed:
            return True
        if self._ready:
            return True
        try:
            ready = self._waker.ready(-1 if timeout is None else max(0.0, timeout))
        except (ValueError, OSError):
            return True  # (closed meanwhile: recv_all says so)
        if ready:
            self._ready = ready
        return bool(ready)

    def recv(self, timeout: float | None = None):
        until = None if timeout is None else time.monotonic() + timeout
        while not self._pending:
            messages = self.recv_all()
            if messages:
                self._pending.extend(messages)
                break
            left = None if until is None else until - time.monotonic()
            if left is not None and left <= 0:
                raise exc.GetTimeoutError(f"no message within {timeout}s")
            self.wait(left)
        return self._pending.popleft()

    def close(self, linger: float = CLOSE_LINGER) -> None:
        """Say goodbye (the listener reports us ``Left`` at once), close the
        socket (flushing for at most `linger` seconds) and free the context
        if this was the transport's last user."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            if self._gone is None:
                try:
                    self._sock.send(_CLOSE, zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
        self._release_sockets(linger)

    def _release_sockets(self, linger: float = 0) -> None:
        self.closed = True
        with self._lock:
            waker = self.__dict__.get("_waker")
            if waker is not None and not waker.closed:
                waker.close()
            _close_monitored(self.__dict__.pop("_sock", None),
                             self.__dict__.pop("_monitor", None), linger)
        self._transport._release(self)


def _close_monitored(sock, monitor, linger: float) -> None:
    """Close `sock` (flushing for at most `linger` seconds) and the socket
    `monitor` that watches it; either may be None (never made)."""
    if sock is not None and monitor is not None:
        try:
            sock.disable_monitor()
        except zmq.ZMQError:
            pass
    if monitor is not None:
        monitor.close(0)
    if sock is not None:
        sock.close(int(linger * 1000))


# -- listener side -----------------------------------------------------------------------
class PeerConnection(Connection):
    """A joined peer, as a listener sees it. `send` from any thread. Its
    messages are reported by `ZmqListener.poll` (or, for a listener used
    through `accept`, returned by `recv`/`recv_all`)."""

    def __init__(self, listener: "ZmqListener", routing_id: bytes, peer: str,
                 sealer: _Sealer, opener: _Opener):
        self._listener = listener
        self.routing_id = routing_id
        self.peer = peer
        self._sealer = sealer
        self._opener = opener
        self.closed = False  # closed here, or gone
        self._inbox: collections.deque = collections.deque()
        self._eof: str | None = None

    def __repr__(self) -> str:
        return f"<PeerConnection {self.peer}>"

    def fileno(self) -> int:
        return self._listener.fileno()

    def send(self, message) -> None:
        listener = self._listener
        encode = listener._transport.encode
        frames = pack(message if encode is None else encode(message), listener.max_message)
        sealer = self._sealer
        with sealer.lock:  # (sealed and sent in number order)
            if len(frames) == 1:  # (most messages)
                listener._send_one(self, sealer.seal_one(frames[0]))
            else:
                listener._send(self, sealer.seal(frames))

    def send_piece(self, header, data, track: bool = False):
        """Send `data` (a contiguous buffer) sealed apart from `header` (a small
        message with no large buffer of its own): the peer's `recv` returns a
        `Piece`, which decrypts `data` straight into where it belongs. With
        `track`, returns a ``zmq.MessageTracker`` that is done once the sealed
        copy of `data` has left this process (or was dropped with its
        connection): a sender can bound how much it has in flight."""
        frames = pack(header, self._listener.max_message)
        if len(frames) != 1:
            raise ValueError("a piece's header must not hold large buffers")
        data = memoryview(data).cast("B")
        if len(frames[0]) + data.nbytes > self._listener.max_message:
            raise _too_large(len(frames[0]) + data.nbytes, self._listener.max_message)
        sealer = self._sealer
        with sealer.lock:
            return self._listener._send(self, sealer.seal([frames[0], data], _PIECE), track)

    def recv_all(self) -> list:
        if not self._inbox and self._eof is None:
            self._listener._pump(time.monotonic())
        if self._inbox:
            out = list(self._inbox)
            self._inbox.clear()
            return out
        if self._eof is not None:
            raise EOFError(f"the connection of {self.peer} is closed: {self._eof}")
        return []

    def recv(self, timeout: float | None = None):
        until = None if timeout is None else time.monotonic() + timeout
        while not self._inbox and self._eof is None:
            if until is not None and time.monotonic() >= until:
                raise exc.GetTimeoutError(f"no message within {timeout}s")
            self._listener._pump(until)
        if self._inbox:
            return self._inbox.popleft()
        raise EOFError(f"the connection of {self.peer} is closed: {self._eof}")

    def close(self) -> None:
        """Tell the peer we closed (its `recv` raises EOFError) and forget it."""
        self._listener._close_peer(self, "closed by the listener")


class ZmqListener(Listener):
    """The ROUTER socket a node accepts peers on; see the module docstring.

    Used either by an event loop (`fileno` + `poll`, one thread) or through
    `accept` and the accepted connections' `recv` (one thread), not both."""

    def __init__(self, transport: "ZmqTransport", address: str | None):
        host, port = parse_address(address, listening=True)
        self._transport = transport
        self.max_message = transport.max_message
        self._lock = threading.Lock()  # the ROUTER socket
        self._poll_lock = threading.Lock()  # the rest: held by poll, and by close
        self._peers: dict[bytes, PeerConnection] = {}
        # Routing ids of peers that left or were closed (recent ones): what they still
        # send is dropped without a word (ROUTER routing ids are never reused).
        self._closed: collections.OrderedDict = collections.OrderedDict()
        self._mode: str | None = None
        self._accepted: collections.deque = collections.deque()
        self._log = _RefusalLog()
        self._fd_peer: dict[int, str] = {}  # fd -> address, of connections being handshaked
        self._fd_spoke: set[int] = set()  # fds of connections that got a frame to us
        self._unaccounted = 0  # connections that closed, not yet matched by a gone peer
        self._probe_until = 0.0
        self._next_probe = 0.0
        self.closed = False
        self._look_all = False  # (see _collect_now)
        self._failure: str | None = None  # a handshake failure, logged at its DISCONNECTED
        # Handshakes under way: routing id -> (client nonce, our nonce), oldest first.
        self._handshakes: collections.OrderedDict = collections.OrderedDict()
        # ZeroMQ credentials used: name -> when it may be forgotten (in that order).
        self._credentials_seen: collections.OrderedDict = collections.OrderedDict()
        ctx = transport._acquire(self)
        try:
            # (ZeroMQ asks the context's ZAP handler about every connection: ours
            # is this socket, answered by `poll`; bound before anyone can connect)
            zap = self._zap = ctx.socket(zmq.REP)
            zap.setsockopt(zmq.LINGER, 0)
            zap.bind(_ZAP_ENDPOINT)
            router = self._router = ctx.socket(zmq.ROUTER)
            router.setsockopt(zmq.ROUTER_MANDATORY, 1)
            transport._tune(router)
            router.setsockopt(zmq.MAXMSGSIZE, FRAME_LIMIT)
            router.setsockopt(zmq.PLAIN_SERVER, 1)
            router.setsockopt(zmq.ZAP_DOMAIN, _ZAP_DOMAIN)
            if ":" in host:
                router.setsockopt(zmq.IPV6, 1)
            self._monitor = router.get_monitor_socket(_MONITORED)
            try:
                router.bind(_endpoint(host, port or "*"))
            except zmq.ZMQError as err:
                raise exc.BackendError(f"cannot listen on {host}:{port}: {err}") from None
            bound = router.getsockopt(zmq.LAST_ENDPOINT).decode()
            self.address = bound[len("tcp://"):]
            self._waker = _Waker()
            self._router_fd, self._monitor_fd, self._zap_fd = (
                self._waker.add(sock) for sock in (router, self._monitor, zap))
            # Setting up took wake-ups of messages already waiting (the monitor's
            # first events): the first poll must look at every socket.
            self._look_all = True
            self._waker.wake()
        except BaseException:
            self._release_sockets(0)
            raise
        if not is_loopback(host):
            print(f"beamlet: warning: listening on {self.address}, beyond loopback: any "
                  f"machine that reaches this port can try to connect (only holders of the "
                  f"cluster's key get in)", file=sys.stderr, flush=True)

    def __repr__(self) -> str:
        return f"<ZmqListener {self.address}{' closed' if self.closed else ''}>"

    def fileno(self) -> int:
        return self._waker.fileno()

    # -- the event loop
    def poll(self, timeout: float = 0) -> list:
        """`Listener.poll`; with `timeout`, waiting up to that many seconds for
        something to happen if nothing has (as a wait on `fileno` would,
        without that descriptor's own wake-up). `wake` ends such a wait."""
        if self._mode != "poll":
            self._use("poll")
        return self._collect(timeout)

    def wake(self) -> None:
        """End a `poll` that waits (safe from a signal handler)."""
        self._waker.wake()

    def _use(self, mode: str) -> None:
        if self._mode is None:
            self._mode = mode
        elif self._mode != mode:
            raise RuntimeError(f"this listener is used through {self._mode}(); it cannot also "
                               f"be used through {mode}()")

    def _collect(self, timeout: float = 0) -> list:
        """What happened since the last call (see `Listener.poll`), waiting up
        to `timeout` seconds (outside the lock, which `close` takes) if nothing has."""
        ready = None
        if timeout:
            try:
                ready = self._waker.ready(timeout)
            except (ValueError, OSError):
                return []  # (closed)
        with self._poll_lock:
            if self.closed:
                return []
            return self._collect_now(ready)

    def _collect_now(self, ready: set | None = None) -> list:
        if ready is None:
            ready = self._waker.ready()
        woken = self._waker.event_fd in ready  # (the ROUTER: see `_Waker`)
        # (The ZAP and monitor sockets are read only here, each until it is empty,
        # so only their own descriptors, or the first poll, say they hold something;
        # a wake-up is for the ROUTER, which other threads send on. A try on an
        # empty socket costs pyzmq an exception.)
        look_all = self._look_all
        if look_all:
            self._look_all = False
        if look_all or self._zap_fd in ready:
            self._serve_zap()
        if look_all or self._monitor_fd in ready:
            self._read_monitor()
        events: list = []
        received: dict = {}
        if woken or self._router_fd in ready:
            self._read_router(events, received)
        now = time.monotonic()
        if self._peers and (now < self._probe_until or now >= self._next_probe):
            self._next_probe = now + PROBE_INTERVAL
            gone = self._probe()
            if gone:
                self._read_router(events, received)  # what they sent before they left
                for peer in gone:
                    if not peer.closed:
                        self._forget(peer, "the peer's connection closed (it closed, died, or "
                                           "stopped answering heartbeats)")
                        events.append(Left(peer, None))
        return events

    def _serve_zap(self) -> None:
        """Answer ZeroMQ's questions (ZAP) about connections in their ZeroMQ
        handshake: only a client whose credentials prove that it holds the
        key, fresh ones (see `ClusterKey.credentials`), gets to send anything."""
        while True:
            try:
                request = self._zap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            why = self._zap_refusal(request)
            if why is not None:
                address = request[3].decode(errors="replace") if len(request) > 3 else ""
                self._log(address or "an unknown address", why)
            self._zap.send_multipart([b"1.0", request[1] if len(request) > 1 else b"",
                                      b"400" if why else b"200", b"refused" if why else b"OK",
                                      b"", b""])

    def _zap_refusal(self, request: list) -> str | None:
        """Why a ZAP request is refused (None: it is not)."""
        if len(request) != 8 or request[0] != b"1.0" or request[5] != b"PLAIN":
            return "it does not speak this transport (not ZeroMQ PLAIN credentials)"
        name, password = request[6], request[7]
        if not self._transport.keys.check_credentials(name, password):
            return ("it does not hold the cluster's key (its ZeroMQ credentials are "
                    "wrong)")
        skew = time.time() - _CREDENTIAL.unpack(name)[1]
        if not abs(skew) <= CLOCK_SKEW:
            return (f"its credentials are {skew:+.0f} s off this machine's clock (at most "
                    f"{CLOCK_SKEW:.0f} s are allowed: are both machines' clocks set?)")
        seen, now = self._credentials_seen, time.monotonic()
        while seen and (next(iter(seen.values())) < now or len(seen) >= MAX_CREDENTIALS_SEEN):
            seen.popitem(last=False)
        if name in seen:
            return "it replayed credentials another connection used"
        seen[name] = now + 2 * CLOCK_SKEW
        return None

    def _read_monitor(self) -> None:
        """Log refused connections; note closed ones (their peers get probed).

        The values of handshake events are error codes, not descriptors, but
        with the context's one I/O thread a failed handshake's event comes
        right before its connection's DISCONNECTED, which has the descriptor,
        so the address read when it was ACCEPTED. That address is read only
        if the connection is not closed already (its DISCONNECTED is not in
        the same batch of events): once closed, its descriptor may be another
        connection's, and a log must not name the wrong peer."""
        batch = []
        while True:
            try:
                batch.append(parse_monitor_message(self._monitor.recv_multipart(zmq.NOBLOCK)))
            except zmq.Again:
                break
        closed_at = {e["value"]: i for i, e in enumerate(batch)
                     if e["event"] == zmq.EVENT_DISCONNECTED}
        for i, event in enumerate(batch):
            kind, value = event["event"], event["value"]
            if kind == zmq.EVENT_ACCEPTED:
                self._fd_peer[value] = ("an unknown address (it left at once)"
                                        if closed_at.get(value, -1) > i else _peer_of_fd(value))
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self._failure = ""  # (refused by `_serve_zap`, which logged why)
            elif kind & (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                         | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                self._failure = _handshake_failure(kind, value)
            elif kind == zmq.EVENT_DISCONNECTED:
                peer = self._fd_peer.pop(value, "an unknown address")
                if self._failure is not None:
                    if self._failure:
                        self._log(peer, self._failure)
                    self._failure = None
                elif value not in self._fd_spoke:
                    # (ZeroMQ reports no event for a protocol error in its handshake)
                    self._log(peer, f"it was cut off in the ZeroMQ handshake: a frame over "
                                    f"{FRAME_LIMIT} bytes, or a message before its credentials "
                                    f"(or it gave up before it said anything)")
                else:  # a connection past its handshake: whose? probe
                    self._fd_spoke.discard(value)
                    self._unaccounted += 1
                    self._probe_until = time.monotonic() + PROBE_WINDOW

    def _read_router(self, events: list, received: dict) -> None:
        batch = []
        with self._lock:
            if _recv_waiting(self._router, batch):
                self._waker.wake()  # the rest at the next call
        for frames in batch:
            if len(frames) < 2:
                continue
            rid = frames[0].bytes
            peer = self._peers.get(rid)
            if peer is None:
                self._newcomer(rid, frames[1:], events)
                continue
            first = frames[1]
            if len(first) == 0:
                continue
            lead = first.buffer[0]
            if lead == _SEALED_LEAD or lead == _PARTS_LEAD:  # (pieces go only to clients)
                try:
                    opener = peer._opener
                    if lead != _SEALED_LEAD:
                        message = _decoded(unpack(opener.open_parts(frames[1:],
                                                                    self.max_message),
                                                  self.max_message), self._transport.decode)
                    elif len(frames) == 2:  # (most messages)
                        message = opener.message_one(first, self.max_message,
                                                     self._transport.decode)
                    else:
                        message = opener.message(frames[1:], self.max_message,
                                                 self._transport.decode)
                except ProtocolError as err:
                    self._drop(peer, err, events)
                    continue
                messages = received.get(peer)
                if messages is None:
                    messages = received[peer] = []
                    events.append(Received(peer, messages))
                messages.append(message)
            elif len(frames) == 2 and len(first) == 1 and lead == _CLOSE[0]:
                self._forget(peer, "the peer closed the connection")
                events.append(Left(peer, None))
            else:
                self._drop(peer, ProtocolError(f"a frame that is not a sealed message: "
                                               f"{bytes(first.buffer[:40])!r}"), events)

    def _newcomer(self, rid: bytes, frames: list, events: list) -> None:
        """A frame from a connection that has not joined: a step of its
        handshake (see the module docstring), never anything to unpickle."""
        if rid in self._closed:
            return  # (sent before it learnt that it was closed)
        first = frames[0]
        self._fd_spoke.add(first.get(zmq.SRCFD))
        address = first.get("Peer-Address") or "an unknown address"
        peer = f"{address} (connection {rid.hex()})"
        size = len(first)
        head = bytes(first.buffer[:1 + auth.NONCE_BYTES + auth.MAX_VERSION_BYTES + 1])
        if not head or head == _CLOSE:
            self._handshakes.pop(rid, None)
            return
        mine = self._transport.version.encode()
        keys = self._transport.keys
        kind = head[:1]
        reply = None
        if kind == _HELLO and len(frames) == 1 and \
                auth.NONCE_BYTES < size <= 1 + auth.NONCE_BYTES + auth.MAX_VERSION_BYTES:
            nonce_c, theirs = head[1:1 + auth.NONCE_BYTES], head[1 + auth.NONCE_BYTES:]
            if theirs == mine and rid not in self._handshakes:
                nonce_s = secrets.token_bytes(auth.NONCE_BYTES)
                self._handshakes[rid] = (nonce_c, nonce_s)
                if len(self._handshakes) > MAX_HANDSHAKES:
                    self._handshakes.popitem(last=False)
                self._reply(rid, _CHALLENGE + nonce_s + keys.mac(b"listener", mine, nonce_c,
                                                                 nonce_s))
                return
            reason = (f"protocol version mismatch: the listener speaks "
                      f"{mine.decode()!r}, the peer {theirs.decode(errors='replace')!r}"
                      if theirs != mine else "it said hello twice")
        elif kind == _RESPONSE and len(frames) == 1 and size == 1 + auth.MAC_BYTES and \
                rid in self._handshakes:
            nonce_c, nonce_s = self._handshakes.pop(rid)
            if hmac.compare_digest(head[1:], keys.mac(b"client", mine, nonce_s, nonce_c)):
                up, down = keys.session(mine, nonce_c, nonce_s)
                conn = PeerConnection(self, rid, peer, _Sealer(down), _Opener(up))
                self._peers[rid] = conn
                self._reply(rid, _WELCOME + mine)
                events.append(Joined(conn))
                return
            reason = "it does not hold the cluster's key (its answer to our challenge is wrong)"
            reply = "authentication failed: this process does not hold the cluster's key"
        elif rid in self._handshakes:
            self._handshakes.pop(rid)
            reason = "it broke the handshake (it sent something else than its answer)"
        else:
            reason = "it sent a message without having said hello"
        self._log(peer, reason)
        self._forget_rid(rid)
        self._reply(rid, _BYE + (reply or reason).encode())

    def _forget_rid(self, rid: bytes) -> None:
        """What a refused connection sends next is dropped without a word."""
        self._closed[rid] = None
        if len(self._closed) > MAX_CLOSED:
            self._closed.popitem(last=False)

    def _reply(self, rid: bytes, frame: bytes) -> None:
        with self._lock:
            try:
                self._router.send_multipart([rid, frame], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # gone already
            self._after_send()

    def _after_send(self) -> None:
        """(Under the lock.) A send may take the ROUTER's wake-up (see `_Waker`):
        if messages wait, make `fileno` readable."""
        if _get(self._router, _EVENTS) & _POLLIN:
            self._waker.wake()

    def _drop(self, peer: PeerConnection, error: BaseException, events: list) -> None:
        print(f"beamlet: closed the connection of {peer.peer}: {error}", file=sys.stderr,
              flush=True)
        self._close_peer(peer, f"the listener closed this connection: {error}")
        events.append(Left(peer, error))

    def _forget(self, peer: PeerConnection, why: str) -> None:
        peer.closed = True
        if peer._eof is None:
            peer._eof = why
        self._peers.pop(peer.routing_id, None)
        self._forget_rid(peer.routing_id)

    def _close_peer(self, peer: PeerConnection, why: str) -> None:
        if peer.closed:
            return
        self._forget(peer, why)
        if not self.closed:
            self._reply(peer.routing_id, _BYE + why.encode())

    def _probe(self) -> list:
        """Peers whose connection is gone (an empty frame to each: a gone
        peer's send fails with ROUTER_MANDATORY)."""
        gone = []
        with self._lock:
            self._router.getsockopt(zmq.EVENTS)  # take pending pipe terminations first
            for rid, peer in self._peers.items():
                try:
                    self._router.send_multipart([rid, _PROBE], zmq.NOBLOCK)
                except zmq.ZMQError as err:
                    if err.errno == errno.EHOSTUNREACH:
                        gone.append(peer)
            self._after_send()
        self._unaccounted = max(0, self._unaccounted - len(gone))
        if not self._unaccounted:
            self._probe_until = 0.0
        return gone

    def _send_one(self, peer: PeerConnection, frame: bytes) -> None:
        """`_send` of a message of one frame (most are), in fewer steps."""
        with self._lock:
            if peer.closed or self.closed:
                raise exc.BackendError(f"the connection of {peer.peer} is closed: {peer._eof}")
            router = self._router
            try:
                _send(router, peer.routing_id, _NOBLOCK_MORE)
                _send(router, frame, _NOBLOCK)
            except zmq.ZMQError as err:
                self._send_failed(peer, err)
            self._after_send()

    def _send_failed(self, peer: PeerConnection, err: zmq.ZMQError):
        """(Under the lock.) Raise the BackendError for a failed send to `peer`."""
        if err.errno == errno.EHOSTUNREACH:
            self._probe_until = time.monotonic() + PROBE_WINDOW  # poll reports it
            self._waker.wake()
            raise exc.BackendError(f"{peer.peer} is gone") from None
        raise exc.BackendError(f"cannot send to {peer.peer}: {err}") from None

    def _send(self, peer: PeerConnection, frames: list, track: bool = False):
        """(None, or with `track` the last frame's MessageTracker.)"""
        with self._lock:
            if peer.closed or self.closed:
                raise exc.BackendError(f"the connection of {peer.peer} is closed: {peer._eof}")
            try:
                if track:
                    tracker = self._router.send_multipart([peer.routing_id, *frames], zmq.NOBLOCK,
                                                          copy=False, track=True)
                else:
                    tracker = None
                    _send_frames(self._router, [peer.routing_id, *frames], len(frames) == 1)
            except zmq.ZMQError as err:
                self._send_failed(peer, err)
            self._after_send()
            return tracker

    # -- accept(): one peer at a time
    def accept(self, timeout: float | None = None) -> PeerConnection:
        self._use("accept")
        until = None if timeout is None else time.monotonic() + timeout
        while not self._accepted:
            if self.closed:
                raise exc.BackendError("the listener is closed")
            if until is not None and time.monotonic() >= until:
                raise exc.GetTimeoutError(f"no connection within {timeout}s")
            self._pump(until)
        return self._accepted.popleft()

    def _pump(self, until: float | None) -> None:
        """Wait for something (until `until`, at most a probe interval), then
        deliver what happened to `accept` and the connections' inboxes."""
        self._use("accept")
        if self.closed:
            return
        left = PROBE_INTERVAL if until is None else min(PROBE_INTERVAL,
                                                         until - time.monotonic())
        if left > 0:
            self._waker.wait(left)
        for event in self._collect():
            if type(event) is Joined:
                self._accepted.append(event.conn)
            elif type(event) is Received:
                event.conn._inbox.extend(event.messages)
            else:
                event.conn._eof = (f"{event.error}" if event.error is not None
                                   else "the peer closed the connection or died")

    def close(self) -> None:
        """Stop listening: every peer's connection closes (they see EOF); the
        address is free when this returns."""
        with self._poll_lock:
            with self._lock:
                if self.closed:
                    return
                self.closed = True
            for peer in list(self._peers.values()):
                self._forget(peer, "the listener closed")
            self._release_sockets(CLOSE_LINGER)

    def _release_sockets(self, linger: float) -> None:
        self.closed = True
        with self._lock:
            waker = self.__dict__.get("_waker")
            if waker is not None and not waker.closed:
                waker.close()
            router = self.__dict__.pop("_router", None)
            monitor = self.__dict__.pop("_monitor", None)
            zap = self.__dict__.pop("_zap", None)
            if zap is not None:
                zap.close(0)
            _close_monitored(router, monitor, linger)
        self._transport._release(self)


# -- the transport -----------------------------------------------------------------------
class ZmqTransport(Transport):
    """Authenticated, encrypted connections between the machines of a
    cluster: every process holds the cluster's `secret`; `version` is the
    message protocol both ends must speak. See the module docstring.

    `max_message`: the largest message (bytes) accepted, and sent;
    `heartbeat_interval`/`heartbeat_timeout` (seconds): how soon a frozen or
    unreachable peer's connection is closed (at most their sum; by default
    `heartbeats` of `dead_after()`). A `codec` (the
    protocol's: ``encode(message)`` into what is pickled, ``decode`` back,
    raising for what is not a message, which closes that connection as a
    message that does not unpickle would) applies to every message `send`
    sends and `recv`/`poll` return (not to a piece's header)."""

    def __init__(self, secret: bytes, version: str, *, max_message: int = MAX_MESSAGE,
                 heartbeat_interval: float | None = None,
                 heartbeat_timeout: float | None = None, codec=None):
        auth.check_version(version)
        self.encode = codec.encode if codec is not None else None
        self.decode = codec.decode if codec is not None else None
        self.keys = ClusterKey(secret)
        self.version = version
        if not isinstance(max_message, int) or not 1024 <= max_message <= MAX_FRAME:
            raise ValueError(f"max_message must be an int from 1024 to {MAX_FRAME} bytes, got "
                             f"{max_message!r}")
        _keep_freed_buffers()
        if heartbeat_interval is None or heartbeat_timeout is None:
            interval, timeout = heartbeats(dead_after())
            heartbeat_interval = interval if heartbeat_interval is None else heartbeat_interval
            heartbeat_timeout = timeout if heartbeat_timeout is None else heartbeat_timeout
        if not 0 < heartbeat_interval <= heartbeat_timeout:
            raise ValueError(f"heartbeats need 0 < interval <= timeout, got "
                             f"{heartbeat_interval} and {heartbeat_timeout}")
        self.max_message = max_message
        self._heartbeat = (heartbeat_interval, heartbeat_timeout)
        self._ctx: zmq.Context | None = None
        self._open: set = set()
        self._ctx_lock = threading.Lock()

    def listen(self, address: str | None = None) -> ZmqListener:
        """Listen on ``"host:port"`` (None: 127.0.0.1 on a free port; port 0:
        a free one); `ZmqListener.address` says where. One listener per
        transport at a time (one port per node). A host beyond loopback is
        allowed, with a warning on stderr."""
        parse_address(address, listening=True)
        with self._ctx_lock:
            if any(isinstance(user, ZmqListener) for user in self._open):
                raise RuntimeError("this ZmqTransport already listens (one port per node): "
                                   "close that listener first")
        return ZmqListener(self, address)

    def connect(self, address: str, timeout: float | None = 10.0) -> ZmqConnection:
        """A connection to the listener at ``"host:port"``: waits (up to
        `timeout`) for it to answer, then authenticates. ``BackendError`` if
        nothing answers in time; ``AuthenticationError`` (at once) if the
        listener refuses our key, does not hold the key, or speaks another
        protocol version (both named)."""
        parse_address(address)
        return ZmqConnection(self, address, timeout)

    def close(self) -> None:
        """Close every listener and connection of this transport."""
        with self._ctx_lock:
            users = list(self._open)
        for user in users:
            user.close()

    # -- the context, shared by this transport's sockets
    def _acquire(self, user) -> zmq.Context:
        """The context, made if `user` is the first; `_release(user)` when done."""
        global _live_contexts
        with self._ctx_lock:
            if self._ctx is None:
                self._ctx = zmq.Context()
                with _live_lock:
                    _live_contexts += 1
            self._open.add(user)
            return self._ctx

    def _release(self, user) -> None:
        """`user` closed its sockets: terminate the context if it was the last."""
        global _live_contexts
        with self._ctx_lock:
            if user not in self._open:
                return
            self._open.discard(user)
            if self._open:
                return
            ctx, self._ctx = self._ctx, None
        ctx.term()
        with _live_lock:
            _live_contexts -= 1
            last = _live_contexts == 0
        if last:
            _context_ended()

    def _tune(self, sock: zmq.Socket) -> None:
        interval, timeout = self._heartbeat
        sock.setsockopt(zmq.SNDHWM, 0)  # sends never block (see "Threads")
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_message)
        sock.setsockopt(zmq.HEARTBEAT_IVL, int(interval * 1000))
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(timeout * 1000))
        sock.setsockopt(zmq.HEARTBEAT_TTL, int((interval + timeout) * 1000))
        sock.setsockopt(zmq.HANDSHAKE_IVL, int(auth.HANDSHAKE_TIMEOUT * 1000))
        sock.setsockopt(zmq.LINGER, int(CLOSE_LINGER * 1000))
