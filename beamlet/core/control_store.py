"""The in-memory ControlStore: the GCS of a single process.

Backends whose control plane lives in one process (inprocess, and the local
backend's driver) use it directly; their workers reach it through the
backend's own messages. A cluster uses the Redis ControlStore instead.
"""
from __future__ import annotations

import sys
import threading
from typing import Any, Callable

from .interfaces import ControlStore

MEMORY_SCHEME = "memory"


def key_bytes(key) -> bytes:
    """A control store key as bytes (a str is its UTF-8 encoding); TypeError otherwise.
    Every ControlStore checks its keys with this, so all refuse the same things."""
    if type(key) is bytes:
        return key
    if isinstance(key, str):
        return key.encode()
    if isinstance(key, (bytes, bytearray, memoryview)):
        return bytes(key)
    raise TypeError(f"a control store key must be str or bytes, got {type(key).__name__}")


def value_bytes(value, what: str):
    """A control store value (or None) as bytes; TypeError, naming `what`, otherwise."""
    if value is None or type(value) is bytes:
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"a control store {what} must be bytes, got {type(value).__name__}")


def message_bytes(message) -> bytes:
    """A published message as bytes; TypeError otherwise."""
    if message is None:
        raise TypeError("a control store message must be bytes, got None")
    return value_bytes(message, "message")


def channel_name(channel) -> str:
    """`channel`, checked to be a str (TypeError otherwise)."""
    if not isinstance(channel, str):
        raise TypeError(f"a control store channel must be a str, got {type(channel).__name__}")
    return channel


class MemoryControlStore(ControlStore):
    """Tables of bytes in dicts, behind one lock; callbacks run in the publisher's thread."""

    def __init__(self):
        self._tables: dict[str, dict[bytes, bytes]] = {}
        self._subscribers: dict[str, list[Callable[[bytes], Any]]] = {}
        self._lock = threading.Lock()

    def put(self, table, key, value, overwrite=True) -> bool:
        key = key_bytes(key)
        if value is None:
            raise TypeError("a control store value must be bytes, got None")
        value = value_bytes(value, "value")
        with self._lock:
            rows = self._tables.setdefault(table, {})
            if not overwrite and key in rows:
                return False
            rows[key] = value
            return True

    def compare_and_set(self, table, key, expected, new) -> bool:
        key = key_bytes(key)
        expected = value_bytes(expected, "expected value")
        new = value_bytes(new, "new value")
        with self._lock:
            rows = self._tables.setdefault(table, {})
            if rows.get(key) != expected:
                return False
            if new is None:
                rows.pop(key, None)
            else:
                rows[key] = new
            return True

    def get(self, table, key):
        return self._tables.get(table, {}).get(key_bytes(key))

    def delete(self, table, key) -> bool:
        key = key_bytes(key)
        with self._lock:
            return self._tables.get(table, {}).pop(key, None) is not None

    def keys(self, table) -> list:
        with self._lock:
            return list(self._tables.get(table, {}))

    def publish(self, channel, message) -> None:
        channel_name(channel)
        message = message_bytes(message)
        for callback in list(self._subscribers.get(channel, ())):
            try:
                callback(message)
            except Exception as err:  # noqa: BLE001 - one subscriber must not stop the rest
                print(f"beamlet: a subscriber of {channel!r} raised {err!r}; ignored",
                      file=sys.stderr)

    def subscribe(self, channel, callback):
        channel_name(channel)
        if not callable(callback):
            raise TypeError(f"a subscriber must be callable, got {type(callback).__name__}")
        with self._lock:
            self._subscribers.setdefault(channel, []).append(callback)

        def unsubscribe():
            with self._lock:
                subs = self._subscribers.get(channel, [])
                if callback in subs:
                    subs.remove(callback)

        return unsubscribe


def open_control_store(url: str | None) -> ControlStore:
    """The ControlStore a backend should use: ``init(control_store=url)``.

    None (or ``"memory://"``) is this process's MemoryControlStore; any other
    URL is opened by the factory a plugin registered for its scheme through the
    ``beamlet_control_stores`` hook (e.g. ``redis://host:port``).
    """
    if url is None:
        return MemoryControlStore()
    if not isinstance(url, str) or "://" not in url:
        raise ValueError(f"control_store must be a URL like 'redis://host:port', got {url!r}")
    from .plugins import control_store_factories
    scheme = url.split("://", 1)[0]
    factories = control_store_factories()
    if scheme == MEMORY_SCHEME and scheme not in factories:
        return MemoryControlStore()
    if scheme not in factories:
        known = sorted(set(factories) | {MEMORY_SCHEME})
        raise ValueError(f"no control store for {scheme!r} URLs ({url!r}); installed schemes: "
                         f"{', '.join(known)}")
    return factories[scheme](url)
