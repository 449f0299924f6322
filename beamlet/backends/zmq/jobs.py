"""A node daemon's side of the drivers that run tasks on it.

`DriverOwner` is the job owner (``local/node.py:JobOwner``) of a daemon's
`Node`: the node engine runs unchanged, and this class stands in for the
drivers connected over ZeroMQ (the messages are in ``protocol.py``).

- ``RunTask``: the values of the task's arguments that came with it are
  stored in the node's store (held until the task's results are out), the
  ones held on other nodes are pulled from there (``objects.Puller``), and
  the rest are fetched from the driver; then the spec goes to the node's
  scheduler. Each small result is sent to the driver as soon as it is
  stored, and the node's copy freed; a large one (in shared memory) stays
  here, held for the driver, which is told where it is (``Located``) and
  lets go of it with ``Release``. A copy pulled here is held and reported
  the same way, so the driver frees every copy.
- What a node holds for drivers is recorded in the control store's object
  locations table off the hot path: `locations` queues each change, and a
  thread of the daemon writes them (`record_locations`).
- A node serves ``Pull`` requests from its store (``objects.serve_pull``).
- A worker's nested submission (`accept`) goes to the driver, with the
  values of its arguments that this node holds; a worker's get of an object
  the node lacks asks the driver for it (`fetch`, the node's hook), which
  answers with the value or where to pull it from.
- An actor's creation result (its token) is held until the driver lets go
  of the actor (``Release``) or leaves: then the node's scheduler ends it.

Workers are shared by the node's drivers, and get the job settings of the
driver that joined last (``job_config``); nested submissions go to that
driver too. One driver at a time is what this supports fully.
"""
from __future__ import annotations

import collections
import os
import sys
import threading

from ... import exceptions as exc
from ...core.refcount import ReferenceCounter
from ...core.serialization import serialize
from ...core.task_spec import ACTOR_CREATION
from ..local.protocol import ShmEntry
from . import protocol as P
from .objects import Puller, serve_pull

REFETCH_DELAY = 0.2  # seconds before asking the driver again for an object a pull missed


class DriverLink:
    """One connected driver, as its node sees it."""

    def __init__(self, conn, job_config: dict):
        self.conn = conn
        self.job_config = job_config
        self.tokens: set[bytes] = set()  # actor tokens held for it
        self.held: set[bytes] = set()  # objects kept here for it (until Release)

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
        self.puller: Puller | None = None  # set with the node (see attach)
        #: (add?, object id): changes to what this node holds, to record in the
        #: control store (``record_locations``).
        self.locations: collections.deque = collections.deque()

    def attach(self, node, transport) -> None:
        """The daemon made its Node: pulls from other nodes go over `transport`."""
        self.node = node
        self.puller = Puller(transport, node.object_store, self._pulled, self._pull_failed)

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
        link.conn.send(P.NestedSubmit(spec, self._ship(link, found)))

    def _held(self, object_ids, seen: set) -> list:
        """``(id, entry)`` of the objects among `object_ids` this node holds, and
        of the ones their values contain (inner ones first), skipping `seen`.
        The driver owns every ref: a value put by a worker here must reach it
        (or where it is must) with the first ref to it that leaves this node."""
        store = self.node.object_store
        out = []
        for object_id in object_ids:
            if object_id in seen:
                continue
            entry = store.entry(object_id)
            if entry is None:
                continue
            seen.add(object_id)
            if entry.refs:
                out.extend(self._held(entry.refs, seen))
            out.append((object_id, entry))
        return out

    def _ship(self, link: DriverLink, found: list) -> list:
        """Tell the driver of `found` (from `_held`): where the large ones are
        (``Located``, sent now; each kept here for it until it lets go), and the
        small ones' values, returned as ``[(id, wire form)]`` for the caller."""
        store = self.node.object_store
        located, values = [], []
        for object_id, entry in found:
            if type(entry) is ShmEntry:
                if not self._hold(link, object_id):
                    continue  # (its driver is gone)
                located.append((object_id, entry.size, entry.is_error, tuple(entry.refs)))
                continue
            try:
                values.append((object_id, P.wire(store.get([object_id], 0)[0])))
            except exc.BeamletError:
                continue  # freed meanwhile
        if located:
            link.conn.send(P.Located(located, False))
        return values

    def _hold(self, link: DriverLink, object_id: bytes) -> bool:
        """Keep an object here for `link`'s driver (until it lets go); False if
        that driver is gone."""
        if self.drivers.get(link.conn) is not link:
            return False
        if object_id not in link.held:
            self.refs.incr(object_id)
            link.held.add(object_id)
            self.locations.append((True, object_id))
        return True

    def _let_go(self, link: DriverLink, object_ids) -> None:
        """`link`'s driver let go of these (tokens or held objects)."""
        objects = [i for i in object_ids if i in link.held]
        link.tokens.difference_update(object_ids)
        link.held.difference_update(objects)
        self.locations.extend((False, i) for i in objects)
        self.refs.decr_all(object_ids)

    def record_locations(self, tables, node_id: str, limit: int = 200) -> None:
        """Write up to `limit` queued changes to the object locations table.
        BackendError (the control store is down) leaves the rest queued."""
        queue = self.locations
        for _ in range(min(limit, len(queue))):
            add, object_id = queue[0]
            if add:
                tables.add_object_location(object_id, node_id)
            else:
                tables.remove_object_location(object_id, node_id)
            queue.popleft()

    def fetch(self, object_ids) -> None:
        """The node's hook: a worker waits for objects this node lacks; ask the
        driver for them (it sends each once it has it, or where to pull it)."""
        link = self.current
        if link is None:
            return
        with self.lock:
            new = [i for i in dict.fromkeys(object_ids) if i not in self._fetching]
            self._fetching.update(new)
        if new:
            link.send(P.Fetch(new))

    def _pull(self, locations) -> None:
        by_source: dict = {}
        for object_id, address in locations:
            by_source.setdefault(address, []).append(object_id)
        for address, ids in by_source.items():
            with self.lock:
                self._fetching.update(ids)
            self.puller.pull(address, ids)

    def _pulled(self, object_id: bytes, size: int, is_error: bool, refs) -> None:
        """A pulled copy is stored (the puller's thread): keep it for the driver
        until it lets go, and say so (so that it frees every copy)."""
        with self.lock:
            self._fetching.discard(object_id)
        link = self.current
        if link is None:
            return  # (freed with the store; nobody can ask for it)
        if self._hold(link, object_id):
            link.send(P.Located([(object_id, size, is_error, tuple(refs))], True))
        else:
            self._released(object_id)

    def _pull_failed(self, object_ids) -> None:
        """A node did not have these (freed, or lost with it): ask the driver
        again, a moment later (by then it knows whether that node died)."""
        with self.lock:
            self._fetching.difference_update(object_ids)
        timer = threading.Timer(REFETCH_DELAY, self.fetch, (list(object_ids),))
        timer.daemon = True
        timer.start()

    # -- messages from drivers (the daemon's loop) --------------------------------
    def on_message(self, conn, message) -> None:
        kind = type(message)
        if kind is P.Pull:  # (from a driver, or from a peer node)
            try:
                serve_pull(self.node.object_store, conn, message.object_ids)
            except exc.BackendError:
                pass  # it left
            return
        link = self.drivers.get(conn)
        if kind is P.DriverHello:
            if link is None and isinstance(message.job_config, dict):
                link = self.drivers[conn] = DriverLink(conn, message.job_config)
                self.current = link
            return
        if link is None:
            raise ValueError(f"{P.describe(message)} before DriverHello")
        if kind is P.RunTask:
            self._run(link, message.spec, message.objects, message.locations)
        elif kind is P.Objects:
            self._store(message.objects)
        elif kind is P.Locations:
            self._pull([(i, a) for i, a in message.locations
                        if not self.node.object_store.contains(i)])
        elif kind is P.Release:
            self._let_go(link, [i for i in message.object_ids
                                if i in link.tokens or i in link.held])
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

    def _run(self, link: DriverLink, spec, objects, locations) -> None:
        store = self.node.object_store
        deps = list(dict.fromkeys(spec.dependencies()))
        self.refs.incr_all(deps)  # until its results are out
        self._store(objects)
        located = {i: a for i, a in locations if not store.contains(i)}
        self._pull(located.items())
        missing = [d for d in deps if d not in located and not store.contains(d)]
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
        """A result is stored here: send it to its driver (or, if large, where it
        is); free our copy of a small one."""
        store = self.node.object_store
        entry = store.entry(object_id)
        try:
            if entry is None:
                sobj = serialize(exc.ObjectLostError("the result was lost on its node"),
                                 is_error=True)
                P.send_object(link.conn, object_id, sobj)
            else:
                # (inner ones first: the driver must hold them when it sees the result)
                values = self._ship(link, self._held(entry.refs, {object_id}))
                if values:
                    link.conn.send(P.Objects(values))
                if type(entry) is ShmEntry:
                    self._ship(link, [(object_id, entry)])
                else:
                    P.send_object(link.conn, object_id, entry)
        except exc.BackendError:
            pass  # it left
        if object_id not in link.held:
            self._released(object_id)  # (not kept for its driver: free it)
        left[0] -= 1
        if not left[0]:
            self.refs.decr_all(deps)

    def driver_left(self, conn) -> None:
        """A driver is gone: let go of its actors and of what was kept for it."""
        link = self.drivers.pop(conn, None)
        if link is None:
            return
        if self.current is link:
            self.current = next(iter(self.drivers.values()), None)
        self._let_go(link, list(link.tokens) + list(link.held))

    def close(self) -> None:
        if self.puller is not None:
            self.puller.close()
