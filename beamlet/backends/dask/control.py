"""DaskControlStore: beamlet's control store held by the Dask scheduler.

Tables live in the scheduler's metadata (``Client.set_metadata``) under
``["beamlet", table, key hex]``, so every client of the cluster (the driver,
each worker's client, a second driver) sees the same tables, and they last as
long as the scheduler. Compare-and-set and delete run inside the scheduler
(``run_on_scheduler``), whose event loop makes them atomic in one round trip; publish/subscribe are Dask's events (``log_event`` and
``subscribe_topic``), delivered to callbacks on one thread of this store.

Dask hands a client the messages of the topics it subscribed to on the same
stream as its futures' results, in the order the scheduler sent them, and the
client takes them in that order: a message published (``log_event`` returned)
before a task's result reached the scheduler is in this store's delivery
queue before the client's Future of that result is done. `delivered` waits
for that queue.
"""
from __future__ import annotations

import sys
import threading
import time
from typing import Any, Callable

from ...core.control_store import channel_name, key_bytes, message_bytes, value_bytes
from ...core.interfaces import ControlStore

_ROOT = "beamlet"
_SUBSCRIBE_TIMEOUT = 10.0


def _compare_and_set(path: list, expected, new, dask_scheduler=None) -> bool:
    """(Runs in the Dask scheduler, atomically.)"""
    *parents, last = path
    node = dask_scheduler.task_metadata
    for part in parents:
        node = node.setdefault(part, {})
    if node.get(last) != expected:
        return False
    if new is None:
        node.pop(last, None)
    else:
        node[last] = new
    return True


def _subscribed(topic: str, client_id: str, dask_scheduler=None) -> bool:
    """(Runs in the Dask scheduler.)"""
    return client_id in dask_scheduler._broker._topics[topic].subscribers


def _delete(path: list, dask_scheduler=None) -> bool:
    """(Runs in the Dask scheduler, atomically.)"""
    *parents, last = path
    node = dask_scheduler.task_metadata
    for part in parents:
        node = node.get(part)
        if not isinstance(node, dict):
            return False
    return node.pop(last, None) is not None


class DaskControlStore(ControlStore):
    def __init__(self, client, root: str = _ROOT):
        """`root`: the metadata key the tables live under (one per cluster of
        beamlet programs; tests use their own)."""
        self.client = client
        self._root = root
        self._lock = threading.Lock()
        self._subscribers: dict[str, list[Callable[[bytes], Any]]] = {}
        self._deliveries = None
        self._thread: threading.Thread | None = None  # (the one delivering)

    def _path(self, table: str, key) -> list:
        return [self._root, table, key_bytes(key).hex()]

    def put(self, table: str, key, value: bytes, overwrite: bool = True) -> bool:
        value = value_bytes(value, "value")
        if value is None:
            raise TypeError("a control store value must be bytes, got None")
        if not overwrite:
            return self.compare_and_set(table, key, None, value)
        self.client.set_metadata(self._path(table, key), value)
        return True

    def compare_and_set(self, table: str, key, expected: bytes | None,
                        new: bytes | None) -> bool:
        path = self._path(table, key)
        expected = value_bytes(expected, "expected value")
        new = value_bytes(new, "new value")
        return self.client.run_on_scheduler(_compare_and_set, path, expected, new)

    def get(self, table: str, key) -> bytes | None:
        return self.client.get_metadata(self._path(table, key), None)

    def delete(self, table: str, key) -> bool:
        return self.client.run_on_scheduler(_delete, self._path(table, key))

    def keys(self, table: str) -> list:
        entries = self.client.get_metadata([self._root, table], None) or {}
        return [bytes.fromhex(k) for k in entries]

    def publish(self, channel, message) -> None:
        self.client.log_event(self._root + "-" + channel_name(channel), message_bytes(message))

    def subscribe(self, channel, callback: Callable[[bytes], Any]) -> Callable[[], None]:
        if not callable(callback):
            raise TypeError(f"a subscriber must be callable, got {type(callback).__name__}")
        topic = self._root + "-" + channel_name(channel)
        with self._lock:
            if self._deliveries is None:
                import queue
                self._deliveries = queue.SimpleQueue()
                self._thread = threading.Thread(target=self._deliver, args=(self._deliveries,),
                                                name="beamlet-dask-events", daemon=True)
                self._thread.start()
            callbacks = self._subscribers.setdefault(topic, [])
            first = not callbacks
            callbacks.append(callback)
            deliveries = self._deliveries
        if first:
            self.client.subscribe_topic(topic, lambda event: deliveries.put((topic, event[1])))
            self._await_subscription(topic)

        def unsubscribe() -> None:
            with self._lock:
                callbacks = self._subscribers.get(topic, [])
                if callback in callbacks:
                    callbacks.remove(callback)
        return unsubscribe

    def _await_subscription(self, topic: str) -> None:
        """Return once the scheduler has this client among the topic's
        subscribers (Dask sends the subscription on a batched stream, so a
        message published at once could otherwise precede it)."""
        deadline = time.monotonic() + _SUBSCRIBE_TIMEOUT
        while not self.client.run_on_scheduler(_subscribed, topic, self.client.id):
            if time.monotonic() > deadline:
                from ... import exceptions as exc
                raise exc.BackendError(f"the Dask scheduler did not register the subscription "
                                       f"to {topic!r} within {_SUBSCRIBE_TIMEOUT:.0f} s")
            time.sleep(0.01)

    def delivered(self, timeout: float) -> bool:
        """Return True once the subscribers have been handed every message this
        store's client received before the call (see the module's docstring:
        each one published before a result this process has seen), False
        after `timeout` s (a subscriber still busy). At once when called by a
        subscriber, which the messages behind it wait for."""
        with self._lock:
            deliveries, thread = self._deliveries, self._thread
        if deliveries is None or threading.current_thread() is thread:
            return True
        reached = threading.Event()
        deliveries.put(reached)  # (FIFO: after every message queued so far)
        return reached.wait(timeout)

    def _deliver(self, deliveries) -> None:
        while True:
            item = deliveries.get()
            if item is None:
                return
            if isinstance(item, threading.Event):  # (a `delivered` waits for this point)
                item.set()
                continue
            topic, message = item
            with self._lock:
                callbacks = list(self._subscribers.get(topic, ()))
            for callback in callbacks:
                try:
                    callback(message)
                except Exception as err:  # noqa: BLE001 - one subscriber must not stop the rest
                    channel = topic[len(self._root) + 1:]
                    print(f"beamlet: a subscriber of {channel!r} raised {err!r}; ignored",
                          file=sys.stderr)

    def close(self) -> None:
        with self._lock:
            topics = [t for t, cbs in self._subscribers.items()]
            self._subscribers.clear()
            deliveries, self._deliveries = self._deliveries, None
        for topic in topics:
            try:
                self.client.unsubscribe_topic(topic)
            except Exception:  # noqa: BLE001 - the client is closed already
                pass
        if deliveries is not None:
            deliveries.put(None)
