"""The local Transport: Unix stream sockets with length-prefixed pickled messages.

Listeners bind Linux abstract-namespace addresses (``@beamlet-...``), so there
is no socket file to clean up after a crash. Each message is a 4-byte
little-endian length and a pickle (protocol 5); a reader takes every complete
message already buffered in one call, so a burst costs one syscall.
"""
from __future__ import annotations

import os
import pickle
import select
import socket
import struct
import threading
import time

from ... import exceptions as exc
from ...core.interfaces import Connection, Listener, Transport

_HEADER = struct.Struct("<I")
_RECV_SIZE = 1 << 18


def _sockaddr(address: str):
    return "\0" + address[1:] if address.startswith("@") else address


class SocketConnection(Connection):
    """A framed message channel over a connected stream socket.

    `send` and `send_many` may be called from several threads (a lock keeps
    frames whole); `recv`/`recv_all` from one reader thread only.
    """

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._buf = bytearray()
        self._pending: list = []  # parsed by recv() but not yet returned
        self._send_lock = threading.Lock()
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, message) -> None:
        data = pickle.dumps(message, 5)
        frame = _HEADER.pack(len(data)) + data
        with self._send_lock:
            try:
                self.sock.sendall(frame)
            except OSError as err:
                raise exc.BackendError(f"the peer of this connection is gone: {err}") from None

    def send_many(self, messages) -> None:
        parts = []
        for message in messages:
            data = pickle.dumps(message, 5)
            parts.append(_HEADER.pack(len(data)))
            parts.append(data)
        with self._send_lock:
            try:
                self.sock.sendall(b"".join(parts))
            except OSError as err:
                raise exc.BackendError(f"the peer of this connection is gone: {err}") from None

    def _parse(self) -> list:
        buf = self._buf
        out = []
        pos = 0
        n = len(buf)
        while n - pos >= 4:
            (size,) = _HEADER.unpack_from(buf, pos)
            if n - pos - 4 < size:
                break
            out.append(pickle.loads(memoryview(buf)[pos + 4:pos + 4 + size]))
            pos += 4 + size
        if pos:
            del buf[:pos]
        return out

    def recv_all(self) -> list:
        """Read what the socket has now (blocking until at least one byte) and
        return every complete message; raises EOFError when the peer closed."""
        if self._pending:
            pending, self._pending = self._pending, []
            return pending
        try:
            chunk = self.sock.recv(_RECV_SIZE)
        except (ConnectionResetError, OSError) as err:
            raise EOFError(str(err)) from None
        if not chunk:
            raise EOFError("connection closed by peer")
        self._buf += chunk
        return self._parse()

    def recv(self, timeout: float | None = None):
        if self._pending:
            return self._pending.pop(0)
        until = None if timeout is None else time.monotonic() + timeout
        while True:
            messages = self._parse()
            if not messages:
                left = None if until is None else max(0.0, until - time.monotonic())
                if left is not None:
                    ready, _, _ = select.select([self.sock], [], [], left)
                    if not ready:
                        raise exc.GetTimeoutError(f"no message within {timeout}s")
                messages = self.recv_all()
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


class SocketListener(Listener):
    def __init__(self, address: str):
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(_sockaddr(address))
        self.sock.listen(128)

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self, timeout: float | None = None) -> SocketConnection:
        if timeout is not None:
            ready, _, _ = select.select([self.sock], [], [], timeout)
            if not ready:
                raise exc.GetTimeoutError(f"no connection within {timeout}s")
        conn, _ = self.sock.accept()
        return SocketConnection(conn)

    def close(self) -> None:
        self.sock.close()


class UnixSocketTransport(Transport):
    """Connections between processes of one machine."""

    def listen(self, address: str | None = None) -> SocketListener:
        return SocketListener(address or f"@beamlet-{os.getpid()}-{os.urandom(6).hex()}")

    def connect(self, address: str, timeout: float | None = 10.0) -> SocketConnection:
        until = None if timeout is None else time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(_sockaddr(address))
                return SocketConnection(sock)
            except OSError as err:
                sock.close()
                if until is not None and time.monotonic() > until:
                    raise exc.BackendError(f"cannot connect to {address!r}: {err}") from None
                time.sleep(0.01)
