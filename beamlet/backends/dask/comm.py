"""``beamlet://``: Dask's TCP transport, with each connection proving the session key first.

The LocalCluster that ``init(backend="dask")`` starts (``cluster.py``) listens
on 127.0.0.1 only, and every connection into its scheduler, nannies and
workers must first show that it holds the session's key: both ends send a
fresh random nonce, then an HMAC-SHA256 under the key of both nonces and of
its side, and each checks the other's before anything else is read (Dask's
own handshake, and so anything unpickled, comes after; the connecting end
proves first, the listening end answers only one that did). Both proofs also
cover the listener's address (dialled, accepted on), so a proof cannot be
relayed to another listener. A connection that fails or stalls
(`_PROOF_TIMEOUT`) is closed. After that the bytes travel as
on Dask's plain ``tcp://``: on loopback, where only root could read them,
TLS (``tls://``) would cost the encryption of every byte twice or more per
hop (a 100 MB task argument: about twice the CPU of plain TCP here) and
protect nothing more.

The key travels in the `KeyedSecurity` given to the cluster's processes and
clients (``Client(address, security=...)``): made in the driver, which runs
the scheduler, and sent to each worker process on its standard input, never
on a command line. Importing this module registers the scheme with
Dask, which the unpickling of a `KeyedSecurity` does in every process that
receives one.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import os

from distributed import Security
from distributed.comm import registry
from distributed.comm.core import CommClosedError
from distributed.comm.tcp import BaseTCPBackend, TCPConnector, TCPListener

SCHEME = "beamlet"
_NONCE = 32
_PROOF_TIMEOUT = 10.0  # seconds for the other end's nonce and proof


class KeyedSecurity(Security):
    """Dask's ``Security`` carrying the session key for ``beamlet://`` (no TLS)."""

    def __init__(self, key: bytes, **kwargs):
        super().__init__(require_encryption=False, extra_conn_args={"beamlet_key": key},
                         **kwargs)

    def __reduce__(self):
        return (KeyedSecurity, (self.extra_conn_args["beamlet_key"],))

    def get_listen_args(self, role):
        return dict(super().get_listen_args(role), extra_conn_args=self.extra_conn_args)


def new_key() -> bytes:
    return os.urandom(32)


def _key_of(connection_args: dict) -> bytes | None:
    return (connection_args.get("extra_conn_args") or {}).get("beamlet_key")


def _proof(key: bytes, side: bytes, listener: bytes, connector_nonce: bytes,
           listener_nonce: bytes) -> bytes:
    return hmac.new(key, b"|".join((side, listener, connector_nonce, listener_nonce)),
                    hashlib.sha256).digest()


def _listening_end(stream, connector: bool) -> bytes:
    """The listener's address as this end sees it: the one dialled (connecting
    end) or the one accepted on (listening end). In both proofs, so that a
    stranger listening elsewhere (say on a dead worker's freed port) cannot
    relay an honest end's proof to the real listener and sit in the middle."""
    sock = stream.socket
    host, port = (sock.getpeername() if connector else sock.getsockname())[:2]
    return f"{host}:{port}".encode()


async def _prove(stream, key: bytes, connector: bool) -> None:
    """Exchange nonces and proofs over a fresh stream; CommClosedError unless
    the other end proved it holds `key` for this very listener. The connecting
    end proves first: the listening end sends its proof only to one that has
    proved itself."""
    listener = _listening_end(stream, connector)
    mine = os.urandom(_NONCE)
    await stream.write(mine)
    theirs = await asyncio.wait_for(stream.read_bytes(_NONCE), _PROOF_TIMEOUT)
    nonces = (mine, theirs) if connector else (theirs, mine)
    if connector:
        await stream.write(_proof(key, b"c", listener, *nonces))
    proof = await asyncio.wait_for(stream.read_bytes(32), _PROOF_TIMEOUT)
    expected = _proof(key, b"s" if connector else b"c", listener, *nonces)
    if not hmac.compare_digest(proof, expected):
        raise CommClosedError("the other end does not hold the beamlet session key "
                              "(or is not the listener dialled)")
    if not connector:
        await stream.write(_proof(key, b"s", listener, *nonces))


class _Connector(TCPConnector):
    prefix = SCHEME + "://"

    async def connect(self, address, deserialize=True, **connection_args):
        key = _key_of(connection_args)
        if key is None:
            raise CommClosedError(f"{self.prefix}{address}: connecting needs the beamlet "
                                  f"session key (the security= of the cluster)")
        comm = await super().connect(address, deserialize, **connection_args)
        try:
            await _prove(comm.stream, key, connector=True)
        except BaseException as err:
            comm.abort()
            if isinstance(err, Exception) and not isinstance(err, CommClosedError):
                raise CommClosedError(f"{self.prefix}{address}: {type(err).__name__} "
                                      f"while proving the session key") from None
            raise
        return comm


class _Listener(TCPListener):
    prefix = SCHEME + "://"

    def _get_server_args(self, **connection_args):
        self._key = _key_of(connection_args)
        if self._key is None:
            raise ValueError(f"listening on {self.prefix} needs the beamlet session key")
        return {}

    async def _prepare_stream(self, stream, address):
        try:
            # (one deadline for the whole proof, not one per read)
            await asyncio.wait_for(_prove(stream, self._key, connector=False),
                                   _PROOF_TIMEOUT)
        except BaseException as err:  # refused: a stranger, a stall, a closed stream
            stream.close()
            if not isinstance(err, Exception):
                raise  # (cancelled: the listener is stopping)
            return None
        return stream


class _Backend(BaseTCPBackend):
    _connector_class = _Connector
    _listener_class = _Listener


registry.backends[SCHEME] = _Backend()
