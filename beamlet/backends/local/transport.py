"""The local Transport: authenticated Unix stream sockets carrying
length-prefixed pickled messages.

Listeners bind Linux abstract-namespace addresses (``@beamlet-...``), so there
is no socket file to clean up after a crash. Such a name is visible to every
local user (``/proc/net/unix``) and anyone may connect, so every connection
first runs the handshake of ``core/auth.py`` with the session's secret, on
raw byte frames of at most 1 KiB: nothing a peer sends is unpickled before it
proved it holds the secret. After that each message is a 4-byte
little-endian length and a pickle (protocol 5), with no further cost per
message (see ``core/auth.py`` for why a Unix stream needs none); a reader
takes every complete message already buffered in one call, so a burst costs
one syscall. A frame over `MAX_FRAME` bytes, or one that does not unpickle,
raises `ProtocolError`: the connection is then useless and must be closed.
"""
from __future__ import annotations

import os
import pickle
import select
import socket
import struct
import sys
import threading
import time

from ... import exceptions as exc
from ...core import auth
from ...core.interfaces import Connection, Joined, Left, Listener, Received, Transport

_HEADER = struct.Struct("<I")
# Bytes asked of each recv. Not more: socket.recv allocates that much for every
# call and shrinks it after, and above glibc's mmap threshold (128 KiB) that is
# an mmap, a page fault and an munmap per message (26 us instead of 4 here).
_RECV_SIZE = 1 << 16
_PEERCRED = struct.Struct("3i")
#: The largest message an authenticated peer may send (bytes); large objects
#: travel through shared memory, not through the socket.
MAX_FRAME = 1 << 30
MAX_PENDING_HANDSHAKES = 64  # connections not yet authenticated; the oldest goes beyond


def _spin_seconds() -> float:
    """`SPIN`: ``BEAMLET_SPIN_US`` (microseconds; 0 turns spinning off), else 100 us."""
    value = os.environ.get("BEAMLET_SPIN_US", "100")
    try:
        micros = float(value)
    except ValueError:
        raise ValueError(f"BEAMLET_SPIN_US must be a number of microseconds, not {value!r}") \
            from None
    if not 0 <= micros <= 10_000:  # (a longer spin is a busy worker, not a quick look)
        raise ValueError(f"BEAMLET_SPIN_US must be 0 to 10000 microseconds, not {value!r}")
    return micros / 1e6


#: Seconds a thread about to sleep until a message comes (a sync get reading its
#: worker, a worker waiting for its next call) first looks without sleeping
#: (`poll_spinning`), once per wait. A sync round trip is two such wake-ups,
#: and a thread asleep on another CPU takes tens of microseconds to wake on a
#: VM (here a pipe round trip is 57 us across CPUs, 4 us on one CPU): spinning
#: halves a local sync call. The cost is at most this much CPU per wait.
SPIN = _spin_seconds()


def poll_spinning(poller: "select.poll", seconds: float) -> bool:
    """Poll `poller` without sleeping for up to `seconds`; whether it became
    ready. The CPU is yielded between looks, so that a peer woken on this very
    CPU (the kernel often wakes it there) runs meanwhile instead of waiting."""
    if poller.poll(0):
        return True
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        os.sched_yield()
        if poller.poll(0):
            return True
    return False


class ProtocolError(exc.BackendError):
    """The peer sent a frame that is too large, does not unpickle, or is not a
    message of the protocol: the connection must be closed."""


def _sockaddr(address: str):
    return "\0" + address[1:] if address.startswith("@") else address


def peer_credentials(sock: socket.socket) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of the process at the other end of a Unix socket, or None."""
    try:
        return _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                _PEERCRED.size))
    except (OSError, AttributeError, struct.error):
        return None


def describe_peer(sock: socket.socket) -> str:
    """'pid N (uid U)' of the peer, for log lines."""
    cred = peer_credentials(sock)
    return f"pid {cred[0]} (uid {cred[1]})" if cred else "an unknown process"


def _too_large(size: int) -> ProtocolError:
    return ProtocolError(f"a message of {size} bytes cannot be sent: at most {MAX_FRAME} bytes "
                         f"(large values travel through the object store)")


class SocketConnection(Connection):
    """A framed message channel over a connected stream socket.

    Made by the transport once the peer is authenticated (`buffered`: the
    bytes that arrived with the end of the handshake). `send` and `send_many` may
    be called from several threads (a lock keeps frames whole and in order);
    `recv`/`recv_all` from one reader thread only. A `codec` (the protocol's:
    ``encode(message)`` into what is pickled, ``decode`` back, raising for
    what is not a message) applies to every message.

    A send waits until the socket took the whole message, unless the
    connection `never_blocks` (those an event loop serves, `SocketListener.poll`):
    then what the socket does not take at once is queued and sent, in order,
    by a thread of the connection's own while the peer reads (`_drain`). For
    the loop must never wait on a peer: a peer blocked sending to it (a
    worker sending results while calls keep coming) reads nothing until the
    loop reads what it sent, and both would wait forever.
    """

    def __init__(self, sock: socket.socket, buffered: bytes = b"", codec=None,
                 never_blocks: bool = False):
        self.sock = sock
        self.never_blocks = never_blocks
        #: Bytes waiting for `_drain` to send them, in order (None: no drain runs).
        self._backlog: list | None = None
        self._encode = codec.encode if codec is not None else None
        self._decode = codec.decode if codec is not None else None
        #: Who is at the other end ('pid N (uid U)'), for log lines: known
        #: while the socket is open, so taken now.
        self.peer = describe_peer(sock)
        self._buf = bytearray(buffered)
        self._pending: list = []  # parsed by recv() but not yet returned
        self._error: ProtocolError | None = None  # a bad frame after good ones: raised next
        self._send_lock = threading.Lock()
        self._poller = None  # (see readable)
        self.closed = False
        if buffered:
            try:
                self._pending = self._parse()
            except ProtocolError as err:
                self._error = err

    @property
    def buffered(self) -> bool:
        """Whether `recv_all` has something to return (or raise) without reading:
        a selector loop must not wait for the socket to become readable then."""
        return bool(self._pending) or self._error is not None

    def fileno(self) -> int:
        return self.sock.fileno()

    def readable(self, timeout: float, spin: float = 0.0) -> bool:
        """Whether `recv_all` has something to return (or raise), waiting up to
        `timeout` seconds for the socket to become readable, the first `spin`
        of them without sleeping (`poll_spinning`). For the thread that reads
        the connection (its poll object is made once, not per wait)."""
        if self._pending or self._error is not None:
            return True
        poller = self._poller
        if poller is None:
            poller = self._poller = select.poll()
            poller.register(self.sock.fileno(), select.POLLIN)
        if spin > 0.0 and poll_spinning(poller, min(spin, timeout)):
            return True
        return bool(poller.poll(timeout * 1000))

    def send(self, message) -> None:
        self.send_encoded(message if self._encode is None else self._encode(message))

    def send_encoded(self, frame) -> None:
        """`send` of a message already in its codec's wire form."""
        data = pickle.dumps(frame, 5)
        if len(data) > MAX_FRAME:
            raise _too_large(len(data))
        self._write(_HEADER.pack(len(data)) + data)

    def send_many(self, messages) -> None:
        parts = []
        encode = self._encode
        for message in messages:
            data = pickle.dumps(message if encode is None else encode(message), 5)
            if len(data) > MAX_FRAME:
                raise _too_large(len(data))
            parts.append(_HEADER.pack(len(data)))
            parts.append(data)
        self._write(b"".join(parts))

    def _write(self, data: bytes) -> None:
        """Send `data` after everything sent before (see the class's doc)."""
        with self._send_lock:
            if self._backlog is not None:  # (earlier bytes wait: these go after them)
                self._backlog.append(data)
                return
            try:
                if not self.never_blocks:
                    self.sock.sendall(data)
                    return
                sent = self.sock.send(data, socket.MSG_DONTWAIT)
            except BlockingIOError:
                sent = 0
            except OSError as err:
                raise exc.BackendError(f"the peer of this connection is gone: {err}") from None
            if sent == len(data):
                return
            self._backlog = [memoryview(data)[sent:]]
        threading.Thread(target=self._drain, name="beamlet-send-backlog", daemon=True).start()

    def _drain(self) -> None:
        """(Its own thread.) Send the backlog as the peer reads, until none is
        left; a peer that is gone leaves it unsent (its reader sees the end,
        and `close` ends a send under way)."""
        while True:
            with self._send_lock:
                chunks = self._backlog
                if not chunks:
                    self._backlog = None
                    return
                self._backlog = []
            try:
                for chunk in chunks:
                    self.sock.sendall(chunk)
            except OSError:
                with self._send_lock:
                    self._backlog = None
                return

    def _parse(self) -> list:
        """Every complete message in the buffer. A bad frame raises ProtocolError,
        at once if it is the first, else at the next call (the messages before
        it are returned first)."""
        buf = self._buf
        out = []
        pos = 0
        n = len(buf)
        decode = self._decode
        try:
            while n - pos >= 4:
                (size,) = _HEADER.unpack_from(buf, pos)
                if size > MAX_FRAME:
                    raise ProtocolError(f"a frame announcing {size} bytes (at most {MAX_FRAME} "
                                        f"are allowed)")
                if n - pos - 4 < size:
                    break
                try:
                    message = pickle.loads(memoryview(buf)[pos + 4:pos + 4 + size])
                except Exception as err:  # noqa: BLE001 - any garbage: the stream is broken
                    raise ProtocolError(f"a frame of {size} bytes does not unpickle: "
                                        f"{err!r}") from None
                if decode is not None:
                    try:
                        message = decode(message)
                    except Exception as err:  # noqa: BLE001
                        raise ProtocolError(f"a frame of {size} bytes: {err}") from None
                out.append(message)
                pos += 4 + size
        except ProtocolError as err:
            if not out:
                raise
            self._error = err
        if pos:
            del buf[:pos]
        return out

    def recv_all(self, block: bool = False) -> list:
        """Read what the socket has now and return every complete message
        (possibly none; `block`: wait for at least one byte first); raises
        EOFError when the peer closed, ProtocolError when it sent a bad frame."""
        if self._pending:
            pending, self._pending = self._pending, []
            return pending
        if self._error is not None:
            raise self._error
        try:
            chunk = self.sock.recv(_RECV_SIZE, 0 if block else socket.MSG_DONTWAIT)
        except BlockingIOError:
            return []
        except (ConnectionResetError, OSError) as err:
            raise EOFError(str(err)) from None
        if not chunk:
            raise EOFError("connection closed by peer")
        if not self._buf and len(chunk) > 4:
            (size,) = _HEADER.unpack_from(chunk)
            if size == len(chunk) - 4:
                # Exactly one whole frame (the usual): what _parse does, without
                # the buffer.
                try:
                    message = pickle.loads(memoryview(chunk)[4:])
                except Exception as err:  # noqa: BLE001 - any garbage: the stream is broken
                    raise ProtocolError(f"a frame of {size} bytes does not unpickle: "
                                        f"{err!r}") from None
                if self._decode is not None:
                    try:
                        message = self._decode(message)
                    except Exception as err:  # noqa: BLE001
                        raise ProtocolError(f"a frame of {size} bytes: {err}") from None
                return [message]
        self._buf += chunk
        return self._parse()

    def recv(self, timeout: float | None = None):
        if self._pending:
            return self._pending.pop(0)
        if self._error is not None:
            raise self._error
        until = None if timeout is None else time.monotonic() + timeout
        while True:
            messages = self._parse()
            if not messages:
                left = None if until is None else max(0.0, until - time.monotonic())
                if left is not None:
                    ready, _, _ = select.select([self.sock], [], [], left)
                    if not ready:
                        raise exc.GetTimeoutError(f"no message within {timeout}s")
                messages = self.recv_all(block=True)
                if not messages:
                    continue
            self._pending.extend(messages[1:])
            return messages[0]

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()


class PendingConnection:
    """An accepted connection whose handshake is under way, driven by a
    selector loop without ever blocking on the peer (see
    `SocketListener.accept_pending`): call `start` once, then `advance`
    whenever the socket is readable; give it up (`refuse`) after `deadline`."""

    def __init__(self, sock: socket.socket, secret: bytes, version: str, codec=None):
        self.sock = sock
        self._codec = codec
        self.peer = describe_peer(sock)
        self.deadline = time.monotonic() + auth.HANDSHAKE_TIMEOUT
        self._handshake = auth.ServerHandshake(secret, version)

    def fileno(self) -> int:
        return self.sock.fileno()

    def start(self) -> None:
        """Check the peer's uid and send the challenge; AuthenticationError if
        the peer is refused already."""
        cred = peer_credentials(self.sock)
        if cred is not None and cred[1] != os.geteuid():
            raise auth.AuthenticationError(f"it runs as uid {cred[1]}, this process as "
                                           f"uid {os.geteuid()}")
        self._send_now(self._handshake.greeting)

    def advance(self) -> SocketConnection | None:
        """Take what the peer sent (without blocking): the authenticated
        connection once the handshake is done, else None. AuthenticationError
        if the peer failed it."""
        try:
            data = self.sock.recv(4096, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        except OSError as err:
            raise auth.AuthenticationError(f"the connection failed: {err}", closed=True) from None
        if not data:
            raise auth.AuthenticationError("it closed the connection during the handshake",
                                           closed=True)
        reply = self._handshake.feed(data)
        if reply is None:
            return None
        self._send_now(reply)
        return SocketConnection(self.sock, self._handshake.leftover, self._codec,
                                never_blocks=True)

    def _send_now(self, data: bytes) -> None:
        # A few dozen bytes into an empty socket buffer: they always fit, and a
        # peer that does not read cannot make us wait.
        try:
            sent = self.sock.send(data, socket.MSG_DONTWAIT)
        except OSError as err:
            raise auth.AuthenticationError(f"the connection failed: {err}") from None
        if sent != len(data):
            raise auth.AuthenticationError("it does not read what it is sent")

    def refuse(self, error: auth.AuthenticationError | None = None) -> None:
        """Tell the peer why (if there is something to tell) and close."""
        if error is not None and error.reply:
            try:
                self.sock.send(error.reply, socket.MSG_DONTWAIT)
            except OSError:
                pass
        self.sock.close()


class SocketListener(Listener):
    """Accepts connections that prove they hold `secret` (speaking `version`).

    Serves its peers either one at a time (`accept`, blocking on each
    handshake) or all at once for an event loop (`fileno` + `poll`): it then
    keeps one epoll set of the listening socket, the handshakes under way
    (never blocking on any) and the joined connections, and reports what
    happened as `Joined`/`Received`/`Left`. A connection the caller closes
    itself is forgotten without a `Left` (the caller knows).
    """

    def __init__(self, address: str, secret: bytes, version: str, codec=None):
        self.address = address
        self._secret = secret
        self._version = version
        self._codec = codec
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(_sockaddr(address))
        self.sock.listen(128)
        self.sock.setblocking(False)  # a peer gone before accept() must not block the loop
        self._epoll: select.epoll | None = None  # made by the first poll()
        self._pending: dict[int, PendingConnection] = {}  # fd -> handshake, oldest first
        self._joined: dict[int, SocketConnection] = {}  # fd -> connection
        self._paused: set[int] = set()  # joined fds that poll does not read (see pause)
        self._next_chores = 0.0

    def fileno(self) -> int:
        if self._epoll is None:
            self._epoll = select.epoll()
            self._epoll.register(self.sock.fileno(), select.EPOLLIN)
        return self._epoll.fileno()

    def accept_pending(self) -> PendingConnection:
        """Accept a connection (the listener must be readable) whose handshake
        the caller drives; OSError if none was waiting after all."""
        conn, _ = self.sock.accept()
        conn.setblocking(True)
        return PendingConnection(conn, self._secret, self._version, self._codec)

    def accept(self, timeout: float | None = None) -> SocketConnection:
        """The next authenticated connection. Blocks on each peer's handshake
        (up to `auth.HANDSHAKE_TIMEOUT`): a loop serving many peers should use
        `poll`. Peers failing it are logged and skipped."""
        until = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if until is None else max(0.0, until - time.monotonic())
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                raise exc.GetTimeoutError(f"no connection within {timeout}s")
            try:
                pending = self.accept_pending()
            except BlockingIOError:
                continue
            try:
                pending.start()
                handshake = auth.serve(pending.sock, self._secret, self._version)
            except auth.AuthenticationError as err:
                log_refused(pending.peer, err)
                pending.refuse()
                continue
            return SocketConnection(pending.sock, handshake.leftover, self._codec)

    # -- serving many peers from one event loop -----------------------------------
    def poll(self) -> list:
        self.fileno()  # (makes the epoll set on first use)
        events: list = []
        now = time.monotonic()
        if now >= self._next_chores:
            self._next_chores = now + 0.5
            for fd, handshake in list(self._pending.items()):
                if handshake.deadline <= now:
                    self._refuse(fd, auth.AuthenticationError(
                        f"it did not complete the handshake within {auth.HANDSHAKE_TIMEOUT}s"))
            for fd, conn in list(self._joined.items()):
                if conn.closed:  # closed by its user
                    del self._joined[fd]
                    self._paused.discard(fd)
        for fd, _ in self._epoll.poll(0):
            if fd == self.sock.fileno():
                self._accept_new()
            elif fd in self._pending:
                self._advance(fd, events)
            elif fd in self._joined:
                self._read(fd, events)
        return events

    def pause(self, conn: SocketConnection) -> bool:
        """Stop reading `conn` in `poll` until `resume`, so that another thread
        may read it directly; False (nothing changed) if it is not a joined
        connection. Neither may run while `poll` does."""
        fd = conn.fileno()
        if fd < 0 or fd in self._paused or self._joined.get(fd) is not conn \
                or self._epoll is None:
            return False
        self._unregister(fd)
        self._paused.add(fd)
        return True

    def resume(self, conn: SocketConnection) -> None:
        """Read `conn` in `poll` again (unless it was closed meanwhile)."""
        fd = conn.fileno()
        if fd < 0 or fd not in self._paused:
            return
        self._paused.discard(fd)
        if not conn.closed and self._joined.get(fd) is conn:
            try:
                self._epoll.register(fd, select.EPOLLIN)
            except (OSError, ValueError):
                pass  # (closed meanwhile)

    def _accept_new(self) -> None:
        try:
            handshake = self.accept_pending()
        except OSError:  # (gone again before we took it)
            return
        try:
            handshake.start()
        except auth.AuthenticationError as err:
            log_refused(handshake.peer, err)
            handshake.refuse(err)
            return
        fd = handshake.fileno()
        stale = self._joined.pop(fd, None)  # closed by its user; its fd number is reused
        if stale is not None:
            stale.closed = True
        self._paused.discard(fd)
        if len(self._pending) >= MAX_PENDING_HANDSHAKES:
            self._refuse(next(iter(self._pending)), auth.AuthenticationError(
                f"more than {MAX_PENDING_HANDSHAKES} connections were authenticating"))
        self._pending[fd] = handshake
        self._epoll.register(fd, select.EPOLLIN)

    def _refuse(self, fd: int, err: auth.AuthenticationError) -> None:
        handshake = self._pending.pop(fd)
        log_refused(handshake.peer, err)
        self._unregister(fd)
        handshake.refuse(err)

    def _advance(self, fd: int, events: list) -> None:
        try:
            conn = self._pending[fd].advance()
        except auth.AuthenticationError as err:
            self._refuse(fd, err)
            return
        if conn is not None:
            del self._pending[fd]
            self._joined[fd] = conn
            events.append(Joined(conn))
            if conn.buffered:
                self._read(fd, events)

    def _read(self, fd: int, events: list) -> None:
        conn = self._joined[fd]
        try:
            messages = conn.recv_all()
        except EOFError:
            self._leave(fd, None, events)
            return
        except ProtocolError as err:
            self._leave(fd, err, events)
            return
        if messages:
            events.append(Received(conn, messages))
        if conn.buffered:  # a bad frame after good ones: report it now
            self._read(fd, events)

    def _leave(self, fd: int, error: BaseException | None, events: list) -> None:
        conn = self._joined.pop(fd)
        self._unregister(fd)
        conn.close()
        events.append(Left(conn, error))

    def _unregister(self, fd: int) -> None:
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):
            pass  # closed already (which removed it)

    def close(self) -> None:
        """Stop accepting; refuse the handshakes under way. Joined connections
        stay open (their users close them)."""
        for fd in list(self._pending):
            self._unregister(fd)
            self._pending.pop(fd).refuse()
        if self._epoll is not None:
            self._epoll.close()
        self.sock.close()


def log_refused(peer: str, error: BaseException) -> None:
    """The one line logged for a connection refused at the handshake."""
    print(f"beamlet: refused a connection from {peer}: {error}", file=sys.stderr, flush=True)


class UnixSocketTransport(Transport):
    """Authenticated connections between the processes of one session on one
    machine: every process holds the session's `secret`; `version` is the
    message protocol both ends must speak, `codec` its wire form (see
    SocketConnection)."""

    def __init__(self, secret: bytes, version: str, codec=None):
        auth.check_secret(secret)
        auth.check_version(version)
        self._secret = secret
        self._version = version
        self._codec = codec

    def listen(self, address: str | None = None) -> SocketListener:
        return SocketListener(address or f"@beamlet-{os.getpid()}-{os.urandom(6).hex()}",
                              self._secret, self._version, self._codec)

    def connect(self, address: str, timeout: float | None = 10.0) -> SocketConnection:
        """Connect (retrying until `timeout` while nothing listens), then
        authenticate: AuthenticationError if the listener refuses us or cannot
        prove it holds the secret."""
        until = None if timeout is None else time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(_sockaddr(address))
                break
            except OSError as err:
                sock.close()
                if until is not None and time.monotonic() > until:
                    raise exc.BackendError(f"cannot connect to {address!r}: {err}") from None
                time.sleep(0.01)
        try:
            handshake = auth.join(sock, self._secret, self._version)
        except auth.AuthenticationError:
            sock.close()
            raise
        return SocketConnection(sock, handshake.leftover, self._codec)
