"""Mutual authentication of a new connection with the session's secret.

Every process of a session (the driver, the zygote, the workers; later every
node of a cluster) holds one secret: `new_secret()`, 32 random bytes that
never appear in a command line or an environment variable. Before a
connection carries a single pickle, its two ends prove to each other that
they hold it, on raw length-prefixed frames (4-byte little-endian length,
then a one-byte kind and its body; at most `MAX_HANDSHAKE_FRAME` bytes, so a
stranger can make us buffer next to nothing)::

    listener -> client   CHALLENGE  nonce_s, version
    client -> listener   RESPONSE   nonce_c, HMAC(secret, "client" | version | nonce_s | nonce_c), version
    listener -> client   ACCEPT     HMAC(secret, "server" | version | nonce_c | nonce_s)
                      or REFUSE     the reason, as text

HMAC is HMAC-SHA256 and compared with `hmac.compare_digest`. Both nonces are
fresh random bytes, so a recorded answer is worth nothing later; the version
(a protocol string such as ``"beamlet-local/1"``) is inside both MACs, and
a peer of another version is refused with a message naming both versions.
Each side gives up after `HANDSHAKE_TIMEOUT` seconds.

The handshake is sans-I/O (`ServerHandshake`, `ClientHandshake`: feed them
the bytes that arrive, send what they return), so a selector loop can run
many at once without blocking on a slow peer; `serve` and `join` run one on
a blocking socket.

What it guarantees depends on the stream underneath:

- On a Unix stream socket the kernel delivers bytes only between the two
  endpoints, so once the handshake succeeded every later byte on the
  connection comes from the authenticated peer: nothing more is needed per
  message (and nothing costs anything per message).
- Over TCP an attacker on the path could take over the stream after the
  handshake. A cluster transport must therefore protect every message too:
  with a MAC keyed by `session_key` (derived from the secret and both nonces,
  different for every connection), or with ZeroMQ CURVE on top.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import select
import socket
import struct
import time

from ..exceptions import BackendError

SECRET_BYTES = 32
NONCE_BYTES = 32
MAC_BYTES = 32  # SHA-256
MAX_HANDSHAKE_FRAME = 1024  # bytes of one handshake frame's body; more closes the connection
MAX_VERSION_BYTES = 200
HANDSHAKE_TIMEOUT = 20.0  # seconds each side waits for the other during the handshake

_HEADER = struct.Struct("<I")
_CHALLENGE, _RESPONSE, _ACCEPT, _REFUSE = b"C", b"R", b"A", b"X"


class AuthenticationError(BackendError):
    """A connection failed the handshake (wrong or missing secret, another
    protocol version, a malformed or oversized frame, a timeout).

    ``reply`` is the REFUSE frame the listener should still send the peer
    (None when there is nothing useful to tell it); ``closed`` is true when
    the peer just closed the connection (e.g. it is shutting down)."""

    def __init__(self, message: str, reply: bytes | None = None, closed: bool = False):
        super().__init__(message)
        self.reply = reply
        self.closed = closed


def new_secret() -> bytes:
    """A fresh session secret."""
    return secrets.token_bytes(SECRET_BYTES)


def check_secret(secret) -> bytes:
    """`secret` if it is usable as a session secret, else ValueError."""
    if not isinstance(secret, bytes) or len(secret) < 16:
        raise ValueError(f"the session secret must be at least 16 bytes, got "
                         f"{type(secret).__name__} of length {len(secret) if secret else 0}")
    return secret


def check_version(version) -> bytes:
    """The encoded protocol version string, or ValueError if it is unusable."""
    if not isinstance(version, str) or not version:
        raise ValueError(f"the protocol version must be a non-empty string, got {version!r}")
    data = version.encode()
    if len(data) > MAX_VERSION_BYTES:
        raise ValueError(f"the protocol version is longer than {MAX_VERSION_BYTES} bytes")
    return data


def _frame(kind: bytes, body: bytes) -> bytes:
    return _HEADER.pack(1 + len(body)) + kind + body


def _mac(secret: bytes, label: bytes, version: bytes, first: bytes, second: bytes) -> bytes:
    return hmac.new(secret, label + b"\0" + version + b"\0" + first + second,
                    hashlib.sha256).digest()


def _session_key(secret: bytes, version: bytes, nonce_s: bytes, nonce_c: bytes) -> bytes:
    return _mac(secret, b"session", version, nonce_s, nonce_c)


class _Frames:
    """Cuts handshake frames out of a byte stream; refuses oversized ones at
    their header, before buffering their body."""

    def __init__(self):
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next(self) -> bytes | None:
        """The next complete frame body, or None if more bytes are needed."""
        buf = self._buf
        if len(buf) < 4:
            return None
        (size,) = _HEADER.unpack_from(buf)
        if size == 0 or size > MAX_HANDSHAKE_FRAME:
            raise AuthenticationError(f"a handshake frame of {size} bytes (at most "
                                      f"{MAX_HANDSHAKE_FRAME} are allowed)")
        if len(buf) < 4 + size:
            return None
        body = bytes(buf[4:4 + size])
        del buf[:4 + size]
        return body

    def rest(self) -> bytes:
        rest = bytes(self._buf)
        self._buf.clear()
        return rest


class _Handshake:
    """What both sides hold: the secret, the version, this side's nonce, the
    frames read so far, and the outcome (`done`, `leftover`, `session_key`)."""

    def __init__(self, secret: bytes, version: str):
        self._secret = check_secret(secret)
        self._version = check_version(version)
        self._nonce = secrets.token_bytes(NONCE_BYTES)
        self._frames = _Frames()
        self.done = False
        self.leftover = b""
        self.session_key: bytes | None = None


class ServerHandshake(_Handshake):
    """The listener's side. Send `greeting` at once; `feed` it what arrives.

    `feed` returns None while more bytes are needed; once the client's
    response is complete and right it returns the ACCEPT frame to send, and
    `done` is true (`leftover`: bytes the client sent after its response;
    `session_key`: the key of this connection). A failing client raises
    `AuthenticationError`, whose ``reply`` (if any) should be sent before
    closing."""

    def __init__(self, secret: bytes, version: str):
        super().__init__(secret, version)
        self.greeting = _frame(_CHALLENGE, self._nonce + self._version)

    def feed(self, data: bytes) -> bytes | None:
        if self.done:
            raise AuthenticationError("the handshake is already over")
        self._frames.feed(data)
        body = self._frames.next()
        if body is None:
            return None
        if body[:1] != _RESPONSE or len(body) < 1 + NONCE_BYTES + MAC_BYTES + 1:
            raise AuthenticationError("the peer did not answer the challenge with a beamlet "
                                      "handshake response")
        nonce_c = body[1:1 + NONCE_BYTES]
        mac = body[1 + NONCE_BYTES:1 + NONCE_BYTES + MAC_BYTES]
        theirs = body[1 + NONCE_BYTES + MAC_BYTES:]
        if theirs != self._version:
            reason = (f"protocol version mismatch: the listener speaks "
                      f"{self._version.decode(errors='replace')!r}, the peer "
                      f"{theirs.decode(errors='replace')!r}")
            raise AuthenticationError(reason, _frame(_REFUSE, reason.encode()))
        expected = _mac(self._secret, b"client", self._version, self._nonce, nonce_c)
        if not hmac.compare_digest(mac, expected):
            reason = "the peer does not hold the session's secret"
            raise AuthenticationError(reason, _frame(_REFUSE, b"authentication failed"))
        self.done = True
        self.leftover = self._frames.rest()
        self.session_key = _session_key(self._secret, self._version, self._nonce, nonce_c)
        return _frame(_ACCEPT, _mac(self._secret, b"server", self._version, nonce_c, self._nonce))


class ClientHandshake(_Handshake):
    """The connecting side: `feed` it what arrives; it returns the RESPONSE
    frame to send once the challenge is in, then None until the listener's
    ACCEPT is checked (`done`; `leftover`, `session_key` as for the server).
    A listener that refuses, or cannot prove it holds the secret, raises
    `AuthenticationError`."""

    def __init__(self, secret: bytes, version: str):
        super().__init__(secret, version)
        self._nonce_s: bytes | None = None

    def feed(self, data: bytes) -> bytes | None:
        if self.done:
            raise AuthenticationError("the handshake is already over")
        self._frames.feed(data)
        reply = None
        while not self.done:
            body = self._frames.next()
            if body is None:
                return reply
            if self._nonce_s is None:
                reply = self._challenge(body)
            else:
                self._verdict(body)
        return reply

    def _challenge(self, body: bytes) -> bytes:
        if body[:1] != _CHALLENGE or len(body) < 1 + NONCE_BYTES + 1:
            raise AuthenticationError("the listener did not start a beamlet handshake")
        self._nonce_s = body[1:1 + NONCE_BYTES]
        theirs = body[1 + NONCE_BYTES:]
        if theirs != self._version:
            raise AuthenticationError(
                f"protocol version mismatch: the listener speaks "
                f"{theirs.decode(errors='replace')!r}, this process "
                f"{self._version.decode(errors='replace')!r}")
        mac = _mac(self._secret, b"client", self._version, self._nonce_s, self._nonce)
        return _frame(_RESPONSE, self._nonce + mac + self._version)

    def _verdict(self, body: bytes) -> None:
        if body[:1] == _REFUSE:
            raise AuthenticationError(f"the listener refused the connection: "
                                      f"{body[1:].decode(errors='replace')}")
        expected = _mac(self._secret, b"server", self._version, self._nonce, self._nonce_s)
        if body[:1] != _ACCEPT or not hmac.compare_digest(body[1:], expected):
            raise AuthenticationError("the listener does not hold the session's secret")
        self.done = True
        self.leftover = self._frames.rest()
        self.session_key = _session_key(self._secret, self._version, self._nonce_s, self._nonce)


def _run(sock: socket.socket, handshake, first: bytes | None, timeout: float):
    until = time.monotonic() + timeout
    old_timeout = sock.gettimeout()

    def send(data: bytes) -> None:
        sock.settimeout(max(0.001, until - time.monotonic()))
        sock.sendall(data)

    try:
        if first:
            send(first)
        while not handshake.done:
            left = until - time.monotonic()
            if left <= 0 or not select.select([sock], [], [], left)[0]:
                raise AuthenticationError(f"no handshake answer within {timeout}s")
            data = sock.recv(4096)
            if not data:
                raise AuthenticationError("the peer closed the connection during the handshake",
                                          closed=True)
            try:
                reply = handshake.feed(data)
            except AuthenticationError as err:
                if err.reply:
                    try:
                        send(err.reply)
                    except OSError:
                        pass
                raise
            if reply:
                send(reply)
    except socket.timeout:
        raise AuthenticationError(f"the peer did not read the handshake within {timeout}s") from None
    except OSError as err:
        raise AuthenticationError(f"the connection failed during the handshake: {err}",
                                  closed=True) from None
    finally:
        try:
            sock.settimeout(old_timeout)
        except OSError:
            pass
    return handshake


def serve(sock: socket.socket, secret: bytes, version: str,
          timeout: float = HANDSHAKE_TIMEOUT) -> ServerHandshake:
    """Run the listener's side on a blocking socket; returns the finished
    handshake (its `leftover`: bytes the client sent after it). Raises
    AuthenticationError."""
    handshake = ServerHandshake(secret, version)
    return _run(sock, handshake, handshake.greeting, timeout)


def join(sock: socket.socket, secret: bytes, version: str,
         timeout: float = HANDSHAKE_TIMEOUT) -> ClientHandshake:
    """Run the client's side on a blocking socket; returns the finished
    handshake (its `leftover`: bytes the listener sent after it). Raises
    AuthenticationError."""
    return _run(sock, ClientHandshake(secret, version), None, timeout)
