"""The in-memory ControlStore: the GCS of a single process.

Backends whose control plane lives in one process (inprocess, and the local
backend's driver) use it directly; their workers reach it through the
backend's own messages. A cluster uses the Redis ControlStore instead.
"""
from __future__ import annotations

import threading
from typing import Any, Callable

from .interfaces import ControlStore

MEMORY_SCHEME = "memory"


def _key(key) -> bytes:
    if type(key) is bytes:
        return key
    if isinstance(key, str):
        return key.encode()
    if isinstance(key, (bytes, bytearray, memoryview)):
        return bytes(key)
    raise TypeError(f"a control store key must be str or bytes, got {type(key).__name__}")


def _value(value, what: str):
    if value is None or type(value) is bytes:
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"a control store {what} must be bytes, got {type(value).__name__}")


class MemoryControlStore(ControlStore):
    """Tables of bytes in dicts, behind one lock; callbacks run in the publisher's thread."""

    def __init__(self):
        self._tables: dict[str, dict[bytes, bytes]] = {}
        self._subscribers: dict[str, list[Callable[[bytes], Any]]] = {}
        self._lock = threading.Lock()

    def put(self, table, key, value, overwrite=True) -> bool:
        key = _key(key)
        if value is None:
            raise TypeError("a control store value must be bytes, got None")
        value = _value(value, "value")
        with self._lock:
            rows = self._tables.setdefault(table, {})
            if not overwrite and key in rows:
                return False
            rows[key] = value
            return True

    def compare_and_set(self, table, key, expected, new) -> bool:
        key = _key(key)
        expected = _value(expected, "expected value")
        new = _value(new, "new value")
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
        return self._tables.get(table, {}).get(_key(key))

    def delete(self, table, key) -> bool:
        key = _key(key)
        with self._lock:
            return self._tables.get(table, {}).pop(key, None) is not None

    def keys(self, table) -> list:
        with self._lock:
            return list(self._tables.get(table, {}))

    def publish(self, channel, message) -> None:
        for callback in list(self._subscribers.get(channel, ())):
            callback(message)

    def subscribe(self, channel, callback):
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
