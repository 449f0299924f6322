"""A node daemon's side of the drivers that run tasks on it.

`DriverOwner` is the job owner (``local/node.py:JobOwner``) of a daemon's
`Node`: the node engine runs unchanged, and this class stands in for the
drivers connected over ZeroMQ (the messages are in ``protocol.py``).

- ``RunTask``: the values of the task's arguments that came with it are
  stored in the node's store (held until the task's results are out), the
  ones that did not are fetched from the driver, and the spec goes to the
  node's scheduler. Each result is sent to the driver as soon as it is
  stored (a shared-memory one straight from its mapping, out of band), and
  then the node's copy is freed.
- A worker's nested submission (`accept`) goes to the driver, with the
  values of its arguments that this node holds; a worker's get of an object
  the node lacks asks the driver for it (`fetch`, the node's hook).
- An actor's creation result (its token) is held until the driver lets go
  of the actor (``Release``) or leaves: then the node's scheduler ends it.

Workers are shared by the node's drivers, and get the job settings of the
driver that joined last (``job_config``); nested submissions go to that
driver too. One driver at a time is what this supports fully.
"""
from __future__ import annotations

import os
import sys
import threading

from ... import exceptions as exc
from ...core.refcount import ReferenceCounter
from ...core.serialization import serialize
from ...core.task_spec import ACTOR_CREATION
from . import protocol as P


class DriverLink:
    """One connected driver, as its node sees it."""

    def __init__(self, conn, job_config: dict):
        self.conn = conn
        self.job_config = job_config
        self.tokens: set[bytes] = set()  # actor tokens held for it

    def send(self, message) -> None:
        try:
            self.conn.send(message)
        except exc.BackendError:
            pass  # it left; its Left event cleans up


class DriverOwner:
    """The job owner of a daemon's Node: the drivers connected to the node."""

    def __init__(self):
        self.node = None  # set once the Node is made
        self.refs = ReferenceCounter(self._released)
        self.lock = threading.Lock()
        self.drivers: dict = {}  # connection -> DriverLink
        self.current: DriverLink | None = None  # the one that joined last
        self._fetching: set[bytes] = set()

    def _released(self, object_id: bytes) -> None:
        # Only present objects: deleting an absent id would make the store
        # discard its value when it arrives (a later task's argument).
        if self.node is not None and self.node.object_store.contains(object_id):
            self.node.release(object_id)

    # -- JobOwner ----------------------------------------------------------------
    def job_config(self) -> dict:
        link = self.current
        if link is not None:
            return dict(link.job_config)
        return {"job_id": "", "namespace": "", "sys_path": list(sys.path), "cwd": os.getcwd()}

    def accept(self, spec) -> None:
        link = self.current
        if link is None:
            raise exc.BackendError("no driver is connected to this node to accept the task")
        seen: set = set()
        found = self._held(spec.dependencies(), seen)
        found.extend(self._held(spec.contained_refs(), seen))
        link.conn.send(P.NestedSubmit(spec, [(i, P.wire(sobj)) for i, sobj in found]))

    def _held(self, object_ids, seen: set) -> list:
        """``(id, value)`` of the objects among `object_ids` this node holds, and of
        the ones their values contain (inner ones first), skipping `seen`. The
        driver owns every ref: a value put by a worker here must reach it
        with the first ref to it that leaves this node."""
        store = self.node.object_store
        out = []
        for object_id in object_ids:
            if object_id in seen or not store.contains(object_id):
                continue
            seen.add(object_id)
            try:
                sobj = store.get([object_id], 0)[0]
            except exc.BeamletError:
                continue  # freed meanwhile
            if sobj.refs:
                out.extend(self._held(sobj.refs, seen))
            out.append((object_id, sobj))
        return out

    def fetch(self, object_ids) -> None:
        """The node's hook: a worker waits for objects this node lacks; ask the
        driver for them (it sends each once it has it)."""
        link = self.current
        if link is None:
            return
        with self.lock:
            new = [i for i in dict.fromkeys(object_ids) if i not in self._fetching]
            self._fetching.update(new)
        if new:
            link.send(P.Fetch(new))

    # -- messages from drivers (the daemon's loop) --------------------------------
    def on_message(self, conn, message) -> None:
        kind = type(message)
        link = self.drivers.get(conn)
        if kind is P.DriverHello:
            if link is None and isinstance(message.job_config, dict):
                link = self.drivers[conn] = DriverLink(conn, message.job_config)
                self.current = link
            return
        if link is None:
            raise ValueError(f"{P.describe(message)} before DriverHello")
        if kind is P.RunTask:
            self._run(link, message.spec, message.objects)
        elif kind is P.Objects:
            self._store(message.objects)
        elif kind is P.Release:
            held = [i for i in message.object_ids if i in link.tokens]
            link.tokens.difference_update(held)
            self.refs.decr_all(held)
        elif kind is P.CancelTask:
            try:
                self.node.scheduler.cancel(message.object_id, message.force)
            except ValueError:
                pass  # the driver checked what it could; the rest cannot be told
        elif kind is P.KillActor:
            self.node.scheduler.kill_actor(message.actor_id, message.no_restart)

    def _store(self, objects) -> None:
        store = self.node.object_store
        for object_id, form in objects:
            with self.lock:
                self._fetching.discard(object_id)
            if not store.contains(object_id):
                store.put(object_id, P.unwire(form))

    def _run(self, link: DriverLink, spec, objects) -> None:
        store = self.node.object_store
        deps = list(dict.fromkeys(spec.dependencies()))
        self.refs.incr_all(deps)  # until its results are out
        self._store(objects)
        missing = [d for d in deps if not store.contains(d)]
        if missing:
            self.fetch(missing)
        if spec.kind == ACTOR_CREATION:
            token = spec.return_ids[0]
            self.refs.incr(token)  # until the driver lets go of the actor
            link.tokens.add(token)
        left = [len(spec.return_ids)]
        for rid in spec.return_ids:
            store.on_ready(rid, lambda object_id: self._result(link, object_id, left, deps))
        try:
            self.node.scheduler.submit(spec)
        except Exception as err:  # noqa: BLE001 - its results say why
            self.node.scheduler.reject(spec, exc.TaskError.from_exception(err,
                                                                         spec.display_name))

    def _result(self, link: DriverLink, object_id: bytes, left: list, deps: list) -> None:
        """A result is stored here: send it to its driver, free our copy."""
        try:
            sobj = self.node.object_store.get([object_id], 0)[0]
        except exc.BeamletError as err:
            sobj = serialize(exc.ObjectLostError(f"the result was lost on its node: {err}"),
                             is_error=True)
        try:
            if sobj.refs:  # (first: the driver must hold them when it sees the result)
                for inner_id, inner in self._held(sobj.refs, {object_id}):
                    P.send_object(link.conn, inner_id, inner)
            P.send_object(link.conn, object_id, sobj)
        except exc.BackendError:
            pass  # it left
        del sobj  # (a shared-memory mapping is a reference: see LocalObjectStore)
        self._released(object_id)
        left[0] -= 1
        if not left[0]:
            self.refs.decr_all(deps)

    def driver_left(self, conn) -> None:
        """A driver is gone: let go of its actors."""
        link = self.drivers.pop(conn, None)
        if link is None:
            return
        if self.current is link:
            self.current = next(iter(self.drivers.values()), None)
        tokens, link.tokens = list(link.tokens), set()
        self.refs.decr_all(tokens)
