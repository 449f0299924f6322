"""RedisControlStore: the ControlStore of a cluster, kept in one Redis server.

Layout (``ns`` is the store's namespace, ``beamlet`` unless the URL's
``?namespace=`` or the constructor says otherwise, so that one Redis can hold
several clusters)::

    {ns}:table:{table}      a hash: key -> value
    {ns}:done:{token}       for a few seconds after a conditional write: its answer
    {ns}@{db}:{channel}     a pub/sub channel (Redis channels ignore the db number)

`compare_and_set` (and so ``put(overwrite=False)``) and `delete` are Lua
scripts that, when they write, also record their answer under a token the
caller made. A call whose connection broke after the command was sent (Redis
restarted under it) is retried with the same token, and a script that already
ran answers what it answered then: a retried compare-and-set never reports a
write of its own as someone else's. (HSETNX or HDEL, retried, would.)

Every call has a connect and a read timeout; one made while Redis is down or
still loading its data is retried until `retry_for` seconds have passed, then
raises BackendError naming the address and the cause. A refused password
raises at once. No message ever holds the password.

Pub/sub: one listener thread per store (started by the first `subscribe`)
owns one connection; callbacks run in it. It sends (un)subscriptions between
messages, within `POLL_INTERVAL` seconds, and when its connection breaks it
reconnects and subscribes again by itself. Redis keeps no history of a
channel, so a subscriber misses what was published while its connection was
down, and a `publish` retried across a restart may be delivered twice:
channels carry notifications; the tables hold the state.
"""
from __future__ import annotations

import re
import secrets
import sys
import threading
import time
import urllib.parse
from typing import Callable

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ... import exceptions as exc
from ...core.control_store import channel_name, key_bytes, message_bytes, value_bytes
from ...core.interfaces import ControlStore

SCHEME = "redis"
DEFAULT_NAMESPACE = "beamlet"
#: Seconds to connect, and to wait for each reply, before an attempt counts as failed.
DEFAULT_TIMEOUT = 5.0
#: Seconds a call keeps retrying while Redis is unreachable or loading its data.
DEFAULT_RETRY_FOR = 10.0
#: How often the pub/sub listener looks for (un)subscriptions to send, in seconds.
POLL_INTERVAL = 0.05

_NAMESPACE = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
_OUR_QUERY = ("namespace", "timeout", "retry_for")

# KEYS: the table's hash, the token key. ARGV: key, has-expected, expected,
# has-new, new, token lifetime (ms). 1 if the key held `expected` and now holds `new`.
_CAS = """
local done = redis.call('GET', KEYS[2])
if done then return tonumber(done) end
local current = redis.call('HGET', KEYS[1], ARGV[1])
if ARGV[2] == '1' then
  if current ~= ARGV[3] then return 0 end
elseif current then
  return 0
end
if ARGV[4] == '1' then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[5])
else
  redis.call('HDEL', KEYS[1], ARGV[1])
end
redis.call('SET', KEYS[2], 1, 'PX', ARGV[6])
return 1
"""

# KEYS: the table's hash, the token key. ARGV: key, token lifetime (ms).
_DELETE = """
local done = redis.call('GET', KEYS[2])
if done then return tonumber(done) end
local removed = redis.call('HDEL', KEYS[1], ARGV[1])
if removed == 1 then redis.call('SET', KEYS[2], 1, 'PX', ARGV[2]) end
return removed
"""

# Errors after which the same call may succeed later: Redis is down, restarting,
# or loading its data. (AuthenticationError derives from ConnectionError; it is
# caught before these.)
_TRANSIENT = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
_REFUSED = (redis.exceptions.AuthenticationError, redis.exceptions.AuthorizationError,
            redis.exceptions.AuthenticationWrongNumberOfArgsError)


def _positive(value, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not number > 0 or number == float("inf"):
        raise ValueError(f"control store: {what} must be a positive number of seconds, "
                         f"got {value!r}")
    return number


def redact(url: str) -> str:
    """`url` with its password (if any) replaced by ``***``, for messages."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


class _Subscription:
    """One `subscribe` call: its callback, until its unsubscribe function runs."""

    __slots__ = ("callback", "active")

    def __init__(self, callback):
        self.callback = callback
        self.active = True


class RedisControlStore(ControlStore):
    """The ControlStore interface on a Redis server (see the module docstring).

    ``url`` is ``redis://[[user]:password@]host[:port][/db][?namespace=NS&timeout=S&retry_for=S]``;
    other query arguments go to redis-py. The constructor arguments, when
    given, take precedence over the URL's. The store checks at once that
    Redis answers (retrying for `retry_for` seconds) and raises BackendError
    if it does not or refuses the password. Thread-safe; `close` it when done.
    """

    def __init__(self, url: str, *, namespace: str | None = None,
                 timeout: float | None = None, retry_for: float | None = None):
        if not isinstance(url, str):
            raise TypeError(f"a Redis URL must be a str, got {type(url).__name__}")
        shown = redact(url)
        try:
            parts = urllib.parse.urlsplit(url)
            host, port = parts.hostname, parts.port
        except ValueError as err:
            raise ValueError(f"control store: bad Redis URL {shown!r}: {err}") from None
        if parts.scheme != SCHEME:
            raise ValueError(f"control store: a Redis URL starts with 'redis://', got {shown!r}")
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        ours = {name: value for name, value in query if name in _OUR_QUERY}
        rest = urllib.parse.urlencode([(n, v) for n, v in query if n not in _OUR_QUERY])
        namespace = namespace if namespace is not None else ours.get("namespace",
                                                                      DEFAULT_NAMESPACE)
        if not isinstance(namespace, str) or not _NAMESPACE.match(namespace):
            raise ValueError(f"control store: a namespace is 1 to 64 letters, digits, '_', "
                             f"'.' or '-', got {namespace!r}")
        self.timeout = _positive(timeout if timeout is not None else
                                 ours.get("timeout", DEFAULT_TIMEOUT), "timeout")
        self.retry_for = _positive(retry_for if retry_for is not None else
                                   ours.get("retry_for", DEFAULT_RETRY_FOR), "retry_for")
        self.namespace = namespace
        try:
            self._client = redis.Redis.from_url(
                urllib.parse.urlunsplit(parts._replace(query=rest)),
                socket_timeout=self.timeout, socket_connect_timeout=self.timeout,
                socket_keepalive=True, retry=Retry(NoBackoff(), 0), protocol=2)
        except ValueError as err:
            raise ValueError(f"control store: bad Redis URL {shown!r}: {err}") from None
        db = self._client.connection_pool.connection_kwargs.get("db", 0)
        #: Where the store's Redis is, for messages: never holds the password.
        self.address = f"{host or 'localhost'}:{port or 6379}/{db}"
        self._password = parts.password
        self._table_prefix = f"{namespace}:table:"
        self._token_prefix = f"{namespace}:done:"
        self._channel_prefix = f"{namespace}@{db}:"
        # An answer must outlive every retry of the call that wrote it.
        self._token_ms = int((self.retry_for + 3 * self.timeout + 5) * 1000)
        self._cas = self._client.register_script(_CAS)
        self._delete = self._client.register_script(_DELETE)
        self._closed = False
        # Pub/sub state, shared with the listener thread under _lock.
        self._lock = threading.Lock()
        self._subscribers: dict[str, list[_Subscription]] = {}
        self._pending: dict[str, threading.Event] = {}  # channels whose SUBSCRIBE is unconfirmed
        self._listener: threading.Thread | None = None
        self._stop = threading.Event()
        self._changed = threading.Event()  # the set of channels with subscribers changed
        try:
            self._call("connect", self._client.ping)
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"RedisControlStore('redis://{self.address}', namespace={self.namespace!r})"

    # -- calls -------------------------------------------------------------------
    def _error(self, text: str) -> exc.BackendError:
        if self._password:
            text = text.replace(self._password, "***")
        return exc.BackendError(f"control store: Redis at {self.address} {text}")

    def _call(self, what: str, fn: Callable, *args):
        """``fn(*args)``, retried while Redis is unreachable; redis-py's errors as BackendError."""
        deadline = None
        delay = 0.02
        while True:
            if self._closed:
                raise exc.BackendError(f"control store: {what} on a closed store "
                                       f"(Redis at {self.address})")
            try:
                return fn(*args)
            except _REFUSED as err:
                raise self._error(f"refused us ({what}): {err} (is the password in the URL "
                                  f"right?)") from None
            except _TRANSIENT as err:
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.retry_for
                if now >= deadline:
                    raise self._error(f"did not answer for {self.retry_for:g} s ({what}): "
                                      f"{type(err).__name__}: {err}") from None
                time.sleep(min(delay, deadline - now))
                delay = min(delay * 2, 0.5)
            except redis.exceptions.RedisError as err:
                raise self._error(f"failed ({what}): {type(err).__name__}: {err}") from None

    def _table(self, table: str) -> str:
        if not isinstance(table, str):
            raise TypeError(f"a control store table name must be a str, got "
                            f"{type(table).__name__}")
        return self._table_prefix + table

    def _token(self) -> str:
        return self._token_prefix + secrets.token_hex(12)

    # -- tables ------------------------------------------------------------------
    def put(self, table, key, value, overwrite=True) -> bool:
        name, key = self._table(table), key_bytes(key)
        if value is None:
            raise TypeError("a control store value must be bytes, got None")
        value = value_bytes(value, "value")
        if not overwrite:
            return self._conditional(name, key, None, value)
        self._call("put", self._client.hset, name, key, value)
        return True

    def compare_and_set(self, table, key, expected, new) -> bool:
        name, key = self._table(table), key_bytes(key)
        expected = value_bytes(expected, "expected value")
        new = value_bytes(new, "new value")
        return self._conditional(name, key, expected, new)

    def _conditional(self, name: str, key: bytes, expected, new) -> bool:
        args = (key, "0" if expected is None else "1", expected or b"",
                "0" if new is None else "1", new or b"", self._token_ms)
        token = self._token()  # the same for every retry of this call
        return bool(self._call("compare_and_set", self._cas, [name, token], args))

    def get(self, table, key):
        return self._call("get", self._client.hget, self._table(table), key_bytes(key))

    def delete(self, table, key) -> bool:
        keys = [self._table(table), self._token()]
        return bool(self._call("delete", self._delete, keys, [key_bytes(key), self._token_ms]))

    def keys(self, table) -> list:
        return self._call("keys", self._client.hkeys, self._table(table))

    # -- pub/sub -----------------------------------------------------------------
    def _channel(self, channel: str) -> str:
        return self._channel_prefix + channel_name(channel)

    def publish(self, channel, message) -> None:
        name = self._channel(channel)
        self._call("publish", self._client.publish, name, message_bytes(message))

    def subscribe(self, channel, callback):
        """See ControlStore.subscribe. Returns once Redis has confirmed the
        subscription (so every message published after that is delivered), or
        raises BackendError if it did not within `retry_for` seconds. Called
        from a callback, it returns at once: the subscription then starts when
        the listener sends it, right after the callback."""
        name = self._channel(channel)
        if not callable(callback):
            raise TypeError(f"a subscriber must be callable, got {type(callback).__name__}")
        entry = _Subscription(callback)
        with self._lock:
            if self._closed:
                raise exc.BackendError(f"control store: subscribe on a closed store "
                                       f"(Redis at {self.address})")
            entries = self._subscribers.setdefault(name, [])
            if not entries and name not in self._pending:
                self._pending[name] = threading.Event()
            entries.append(entry)
            confirmed = self._pending.get(name)
            self._changed.set()
            self._start_listener()

        def unsubscribe():
            with self._lock:
                entry.active = False
                entries = self._subscribers.get(name, [])
                if entry in entries:
                    entries.remove(entry)
                if not entries and self._subscribers.pop(name, None) is not None:
                    self._changed.set()

        if confirmed is not None and threading.current_thread() is not self._listener:
            limit = self.retry_for + self.timeout
            if not confirmed.wait(limit) or self._closed:
                unsubscribe()
                if self._closed:
                    raise exc.BackendError(f"control store: closed during a subscribe "
                                           f"(Redis at {self.address})")
                raise self._error(f"did not confirm a subscription to {channel!r} within "
                                  f"{limit:g} s")
        return unsubscribe

    def _start_listener(self) -> None:
        """Start the listener thread if it is not running (in this process)."""
        listener = self._listener
        if listener is not None and listener.is_alive():
            return
        self._listener = threading.Thread(target=self._listen, daemon=True,
                                          name=f"beamlet-redis-listener-{self.namespace}")
        self._listener.start()

    def _listen(self) -> None:
        """The listener thread: keep one connection subscribed to exactly the
        channels that have subscribers, and hand each message to them."""
        pool = self._client.connection_pool
        conn = None
        subscribed: set[str] = set()
        outstanding: dict[str, int] = {}  # channel -> SUBSCRIBEs sent, not yet confirmed
        delay = 0.02
        reported = False  # a lasting failure is reported once, not at every retry
        while not self._stop.is_set():
            try:
                if conn is None:
                    conn = pool.connection_class(**pool.connection_kwargs)
                    conn.connect()
                    subscribed.clear()
                    outstanding.clear()
                with self._lock:
                    self._changed.clear()
                    wanted = set(self._subscribers)
                    for name in wanted & subscribed:  # unsubscribed and subscribed again
                        event = self._pending.get(name)
                        if event is not None and not outstanding.get(name):
                            event.set()
                            del self._pending[name]
                add, drop = wanted - subscribed, subscribed - wanted
                if add:
                    conn.send_command("SUBSCRIBE", *sorted(add))
                    for name in add:
                        outstanding[name] = outstanding.get(name, 0) + 1
                if drop:
                    conn.send_command("UNSUBSCRIBE", *sorted(drop))
                subscribed = wanted
                if not subscribed:
                    self._changed.wait(POLL_INTERVAL)
                    continue
                # Read until a quiet moment, or until the channels change (so that
                # a busy channel never holds up a subscription).
                while not self._changed.is_set() and conn.can_read(timeout=POLL_INTERVAL):
                    self._dispatch(conn.read_response(), outstanding)
                delay, reported = 0.02, False
            except (redis.exceptions.RedisError, OSError) as err:
                if conn is not None:
                    conn.disconnect()
                    conn = None
                permanent = not isinstance(err, _TRANSIENT) or isinstance(err, _REFUSED)
                if permanent and not reported:
                    reported = True
                    print(f"beamlet: {self._error(f'broke the subscriptions: {err}')}; "
                          f"retrying", file=sys.stderr)
                self._stop.wait(delay)
                delay = min(delay * 2, 0.5)
        if conn is not None:
            conn.disconnect()

    def _dispatch(self, reply, outstanding: dict[str, int]) -> None:
        kind, name = reply[0], reply[1].decode()
        if kind == b"subscribe":
            left = outstanding.pop(name, 1) - 1
            if left:
                outstanding[name] = left
            else:
                with self._lock:
                    event = self._pending.pop(name, None)
                if event is not None:
                    event.set()
        elif kind == b"message":
            with self._lock:
                entries = list(self._subscribers.get(name, ()))
            for entry in entries:
                if not entry.active:
                    continue
                try:
                    entry.callback(reply[2])
                except Exception as err:  # noqa: BLE001 - one subscriber must not stop the rest
                    channel = name[len(self._channel_prefix):]
                    print(f"beamlet: a subscriber of {channel!r} raised {err!r}; ignored",
                          file=sys.stderr)

    # -- life ----------------------------------------------------------------------
    def close(self, timeout: float = 5.0) -> None:
        """Stop the listener (joining it for up to `timeout` seconds) and close the
        connections. Later calls raise BackendError; the data stays in Redis."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            listener = self._listener
            for event in self._pending.values():
                event.set()
        self._stop.set()
        self._changed.set()
        if listener is not None and listener is not threading.current_thread():
            listener.join(timeout)
        self._client.close()
        self._client.connection_pool.disconnect()

