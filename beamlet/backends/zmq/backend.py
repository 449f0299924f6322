"""The ``cluster`` backend: a driver that runs its tasks and actors on the
nodes of a cluster started with ``beamlet start`` (``daemon.py``).

``init(address="HOST:PORT")`` (or ``"auto"``: the head started on this
machine; or a plain ``init()`` with ``$BEAMLET_ADDRESS``) asks the head for
the control store and the alive nodes, then connects to each node's own
listener. The key comes from ``init(token=...)``, ``$BEAMLET_TOKEN`` or the
cluster file ``beamlet start --head`` wrote here; a wrong one fails the
transport's handshake at once (``AuthenticationError``).

The driver owns its objects and knows where each one is, without asking
Redis: a small result comes back to its in-memory store as soon as it is
stored on its node; a large one stays on its node, and the driver keeps a
`RemoteEntry` for it (which nodes hold a copy). A task's arguments go with
it (``RunTask``): small values inline, large ones as the address of a node
to pull them from, node to node, never through the driver; a node asks for
what it lacks (``Fetch``). The driver's own get of a remote object pulls it
from a node that holds it. When the last ref to an object is gone, every
node holding a copy lets go of it (``Release``). When a node dies, each
object it alone held is made again by re-running its task (lineage), or
becomes an ObjectLostError (an object a worker put there, an actor's result).
`ClusterScheduler` places each task where its resource request fits, on the
least loaded such node, and each actor's calls on the actor's node, in order
(most of them, once the actor was called twice, straight to its worker over
a direct channel to the driver's own port: ``direct.py``).
A node's own scheduler queues what it cannot run yet (it knows when a task
blocked in ``get`` lends its CPUs to others, which the driver does not), but
only a window of tasks beyond what its resources hold (spillback): the
window is the node's recent pace (tasks it finished in the last
`WINDOW_PERIOD`), so short tasks keep each node's pipeline full, while
behind long ones nothing waits; the driver keeps the rest and places each
as soon as a node can take it, on whichever node frees first. A worker's
nested submissions, retries and rebuilds are never held (a parent blocked
in ``get`` must not wait on the driver for its child). When a node's
scheduler lends the CPUs of a task (or actor) blocked in ``get`` or
``wait`` to others, the node tells the driver that placed it (``Lent``, with
its next report), which counts them free meanwhile: held tasks go at once
to a node whose tasks wait for them. As a last resort for waits a node
cannot see (a task polling in a loop), a held task waits at most
`HOLD_MAX` seconds (``BEAMLET_SPILLBACK_HOLD_MAX``) while no node it fits
finishes anything; then the oldest goes to the least loaded, one per
`HOLD_MAX`: tasks that wait for each other that way are slowed, never
stuck. A held task whose large arguments are on a node waits for that node
(it goes there as soon as that node can take it) for `LOCALITY_WAIT`
seconds at most (``BEAMLET_LOCALITY_WAIT``), then goes to whichever node
can take it; the others held go on meanwhile. When a node's connection
drops, its tasks are retried elsewhere (per ``max_retries``) or fail, and
its actors' calls fail with ``ActorDiedError``: no ``get`` waits on a dead
node. The bundles of placement groups it held are placed again on the
alive nodes as each group's strategy says (the group is RESCHEDULING
meanwhile, waiting for room or for a node that fits to join), and what ran
or waited in them runs there (per ``max_retries`` and ``max_restarts``). A
``NodeAffinitySchedulingStrategy`` pins a call to its node (soft: while that
node is alive and fits it). Nodes that join after ``init`` are found in the
nodes table (every `NODES_POLL` seconds) and get work too. The nodes
report what their schedulers tell observers, so the driver's plugins hear
of every attempt's end and actor state as on the local backend (see
``jobs.py``).
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import select
import sys
import threading
import time

from ... import exceptions as exc
from ...core import plugins
from ...core.control_store import open_control_store
from ...core.generators import ack_id, closed_id, stream_prefix
from ...core.interfaces import Backend, Scheduler
from ...core.memory_store import MemoryObjectStore
from ...core.ids import new_id
from ...core.object_ref import ObjectRef
from ...core.options import check_backend_options
from ...core.placement import ready_value, removed_value, split_node_affinity
from ...core.resources import BUNDLE_CAPACITY, cpu_names, group_resource
from ...core.scheduling import CANCELLED, FAILED, FINISHED, may_retry
from ...core.serialization import serialize
from ...core.tables import ActorState
from ...core.task_events import RUNNING
from ...core.task_spec import ACTOR_CREATION, ACTOR_METHOD, TASK, TaskSpec
from ..local import shm
from ..local.transport import ProtocolError
from . import direct as D
from . import protocol as P
from .objects import Assembly, BufferPool, as_chunk
from .transport import Piece

CONNECT_TIMEOUT = 10.0  # seconds to reach the head or a node
NODES_POLL = 1.0  # seconds between looks at the nodes table, for nodes that joined since
JOIN_TIMEOUT = 2.0  # seconds to reach a node that joined since (else: tried at the next look)
#: Seconds a get reading its result off its node's connection (`wait_on`)
#: waits before looking again whether the result came another way.
DIRECT_SLICE = 0.05
#: Spillback: a node is sent tasks beyond what its resources hold at most as
#: many as it finished in the last period (seconds; see `NodeLink.window`).
WINDOW_PERIOD = 0.25
#: Spillback's last resort: seconds a held task waits while no node it fits
#: finishes anything, before it is sent anyway (see the module's docstring);
#: the environment's ``BEAMLET_SPILLBACK_HOLD_MAX`` overrides it.
HOLD_MAX = 2.0
#: Spillback and locality: seconds a held task whose large arguments are on a
#: node waits for that node to take it, before any node may (see `_hold`);
#: the environment's ``BEAMLET_LOCALITY_WAIT`` overrides it.
LOCALITY_WAIT = 0.5
#: Bytes of freed pull buffers a driver keeps for its next pulls (see BufferPool).
PULL_BUFFERS_KEPT = 256 << 20


class NodeLink:
    """A node as the driver sees it: its connection and what runs there."""

    def __init__(self, info: dict, conn):
        self.node_id = info["node_id"]
        self.address = info["address"]
        self.resources = dict(info.get("resources") or {})
        self.conn = conn
        self.alive = True
        self.placed: dict[bytes, TaskSpec] = {}  # task id -> unfinished spec placed here
        self.load: dict[str, float] = {}  # resources of what is placed here
        self.borrowed: set[bytes] = set()  # objects its workers hold refs to (Borrow)
        #: Held by the thread reading the connection: the I/O thread, or a
        #: thread whose get waits for a result from this node (`wait_on`).
        self.reading = threading.Lock()
        self.bytes_received = 0  # object values that came from it (see object_bytes_received)
        self.extra: set[bytes] = set()  # tasks sent beyond what its resources held then
        self.finished = [0, 0]  # tasks finished here in the period before, in this one
        self.period_start = time.monotonic()
        #: Tasks finished here ever, and that count when `unstall` last saw it
        #: change (with when): a node that finished nothing for HOLD_MAX.
        self.finished_total = 0
        self.stall_seen = (0, self.period_start)
        #: Tasks whose worker lends out its CPUs while it waits in get or wait
        #: (the node said so: ``Lent``): those are taken off `load` meanwhile.
        self.lent: set[bytes] = set()

    def fits(self, request: dict) -> bool:
        return all(self.resources.get(k, 0) >= v for k, v in request.items())

    def fits_now(self, request: dict) -> bool:
        """Whether `request` fits beside what is placed here now."""
        load, resources = self.load, self.resources
        for k, v in request.items():
            if load.get(k, 0) + v > resources.get(k, 0) + 1e-9:
                return False
        return True

    def window(self, now: float) -> int:
        """How many tasks beyond its resources it may queue: as many as it
        finished in the last period (the one before, or this one if more)."""
        elapsed = now - self.period_start
        if elapsed >= WINDOW_PERIOD:
            self.finished = [self.finished[1] if elapsed < 2 * WINDOW_PERIOD else 0, 0]
            self.period_start = now
        return max(self.finished)

    def can_take(self, request: dict, now: float) -> bool:
        """Whether a task may be sent here now: it fits, or the window has room."""
        return self.fits_now(request) or len(self.extra) < self.window(now)

    def lend(self, spec: TaskSpec, lent: bool) -> bool:
        """Its node lent out the CPUs of `spec` placed here (`lent`), or took
        them back: count them free meanwhile. Whether anything changed."""
        if (spec.task_id in self.lent) is lent:
            return False
        if lent:
            self.lent.add(spec.task_id)
        else:
            self.lent.discard(spec.task_id)
        sign = -1 if lent else 1
        resources = spec.resources  # (unchanged while it is placed)
        for k in cpu_names(resources):
            self.load[k] = self.load.get(k, 0) + sign * resources[k]
        return True

    def weight(self, request: dict) -> float:
        """How full it would be with `request` placed too: the largest fraction
        of a requested resource then placed here."""
        return max(((self.load.get(k, 0) + v) / self.resources[k]
                    for k, v in request.items() if v and self.resources.get(k)), default=0.0)

    def add(self, spec: TaskSpec, sign: int) -> None:
        for k, v in spec.resources.items():
            self.load[k] = self.load.get(k, 0) + sign * v

    def send(self, message) -> bool:
        try:
            self.conn.send(message)
            return True
        except exc.BackendError:
            return False


class RemoteEntry:
    """An object held in the stores of nodes (not in the driver's memory):
    the driver's store holds this in its place, and the scheduler's `remote`
    table too (it outlives a copy the driver pulls for itself)."""

    __slots__ = ("total_bytes", "is_error", "refs", "holders")

    def __init__(self, size: int, is_error: bool, refs):
        self.total_bytes = size
        self.is_error = bool(is_error)
        self.refs = tuple(refs)
        self.holders: list[NodeLink] = []  # nodes with a copy, the first made it

    def source(self) -> "NodeLink | None":
        """An alive node to pull it from."""
        return next((n for n in self.holders if n.alive), None)


class _Pull:
    """A get of the driver's waiting for a remote object to arrive."""

    __slots__ = ("node", "done", "assembly", "result")

    def __init__(self, node: NodeLink):
        self.node = node
        self.done = threading.Event()
        self.assembly: Assembly | None = None
        self.result = None  # the SerializedObject; None if its node died


class ClusterObjectStore(MemoryObjectStore):
    """The driver's store: values in memory, and `RemoteEntry`s for objects
    held on nodes, pulled on the first read."""

    def __init__(self, backend: "ClusterBackend", refs):
        super().__init__(refs)
        self.backend = backend

    def _materialize(self, object_id: bytes, entry):
        if type(entry) is not RemoteEntry:
            return entry
        sobj = self.backend.pull(object_id, entry)
        if sobj is None:  # its node died: a copy elsewhere, rebuilt, or lost
            with self.backend.scheduler.lock:
                pass  # (the scheduler has dealt with the death once it lets go)
            return self.get([object_id])[0]
        with self._guard:
            if self._objects.get(object_id) is entry:
                self._objects[object_id] = sobj  # (later reads need no pull)
        return sobj

    def _block(self, object_ids, arrived, timeout) -> bool:
        if len(object_ids) == 1:
            if self.backend.direct is not None:
                channel = self.backend.scheduler.channel_making(object_ids[0])
                if channel is not None:
                    return self.backend.wait_on_direct(channel, arrived, timeout)
            node = self.backend.scheduler.node_making(object_ids[0])
            if node is not None:
                return self.backend.wait_on(node, arrived, timeout)
        return arrived.wait(timeout)

    def forget(self, object_id: bytes) -> None:
        """Take an entry out as if it never arrived (it is being made again)."""
        with self._guard:
            entry = self._objects.pop(object_id, None)
        if entry is not None and entry.refs and self._refs is not None:
            self._refs.decr_all(entry.refs)

    def replace(self, object_id: bytes, value) -> None:
        """Put `value` in place of a stored entry (its refs are the same or none)."""
        with self._guard:
            old = self._objects.get(object_id)
            if old is None:
                return
            self._objects[object_id] = value
        if old.refs and not value.refs and self._refs is not None:
            self._refs.decr_all(old.refs)


class _Group:
    """A placement group as the driver sees it: its bundles, the node each is
    reserved on (none while it waits for room; some while those lost with a
    dead node wait to be placed again), and what waits for it."""

    __slots__ = ("info", "key", "placed", "capacity", "waiting", "node_ready", "issued",
                 "shares", "waiter", "ready", "created")

    def __init__(self, info):
        self.info = info
        self.key = info.pg_id.hex()
        self.placed: dict[int, NodeLink] = {}  # bundle index -> its node, once reserved
        #: Its resource names (as `placement_request` renames a request) -> how
        #: much there is of each: what a call in it may ask for at most.
        self.capacity: dict[str, float] = self._resources(range(len(info.bundles)))
        self.waiting: list[TaskSpec] = []  # submitted while it waits for room, in order
        #: The ready id each node answers under that did not answer yet (see
        #: _reserve_group), and every ready id given out since it was last ready.
        self.node_ready: dict[bytes, NodeLink] = {}
        self.issued: list[bytes] = []
        self.shares = 0  # shares sent to nodes ever (each answers under an id of its own)
        self.waiter = None
        self.ready = False  # its ready value is stored
        self.created = False  # it was ready once (lost bundles: RESCHEDULING, not PENDING)

    def complete(self) -> bool:
        """Whether every bundle is reserved on a node."""
        return len(self.placed) == len(self.info.bundles)

    def resources_on(self, node: NodeLink) -> dict[str, float]:
        """The group's resource names `node` holds (its bundles there)."""
        return self._resources([i for i, where in self.placed.items() if where is node])

    def _resources(self, indices) -> dict[str, float]:
        """The group's resource names (each bundle's, and the group-wide ones)
        -> how much its bundles `indices` hold of each."""
        out: dict[str, float] = {}
        for i in indices:
            for name, amount in list(self.info.bundles[i].items()) + [("bundle", BUNDLE_CAPACITY)]:
                out[group_resource(name, self.key, i)] = amount
                wide = group_resource(name, self.key)
                out[wide] = out.get(wide, 0) + amount
        return out


def _assign(bundles: dict, strategy: str, free: dict,
            used: dict | None = None) -> dict[int, "NodeLink"] | None:
    """Which node each bundle (index -> bundle) goes to, as `strategy` says
    (Ray's meaning: STRICT_PACK all on one node; PACK on as few as can hold
    them; STRICT_SPREAD each on a node of its own; SPREAD on as many as can),
    given `free` ({node: {resource: amount}}); None if they do not fit so.
    `used`: node -> how many of the group's other bundles it holds (bundles
    placed again after their node died join those: STRICT_PACK and PACK go to
    their node first, STRICT_SPREAD never does, SPREAD prefers other nodes)."""
    used = used or {}
    nodes = list(free)

    def fits(node, bundle, taken) -> bool:
        return all(free[node].get(k, 0) - taken.get(node, {}).get(k, 0) >= v - 1e-9
                   for k, v in bundle.items())

    def take(node, bundle, taken) -> None:
        mine = taken.setdefault(node, {})
        for k, v in bundle.items():
            mine[k] = mine.get(k, 0) + v

    need: dict[str, float] = {}
    for bundle in bundles.values():
        for k, v in bundle.items():
            need[k] = need.get(k, 0) + v
    whole = [n for n in nodes if fits(n, need, {})
             and (strategy != "STRICT_PACK" or not used or used.get(n))]
    if strategy in ("PACK", "STRICT_PACK") and whole:
        best = max(whole, key=lambda n: (used.get(n, 0), sum(free[n].values())))
        return {i: best for i in bundles}
    if strategy == "STRICT_PACK":
        return None
    order = sorted(bundles, key=lambda i: -sum(bundles[i].values()))  # largest first
    if strategy == "STRICT_SPREAD":
        nodes = [n for n in nodes if not used.get(n)]

        def spread(k, busy, taken):  # (backtracking: a few bundles, a few nodes)
            if k == len(order):
                return {}
            i = order[k]
            for node in sorted(nodes, key=lambda n: -sum(free[n].values())):
                if node not in busy and fits(node, bundles[i], taken):
                    take(node, bundles[i], taken)
                    rest = spread(k + 1, busy | {node}, taken)
                    for name, v in bundles[i].items():
                        taken[node][name] -= v
                    if rest is not None:
                        return {i: node, **rest}
            return None
        return spread(0, frozenset(), {})
    # PACK that fits no single node, and SPREAD: greedy, largest bundles first.
    taken: dict = {}
    count: dict = dict(used)
    out = {}
    for i in order:
        fitting = [n for n in nodes if fits(n, bundles[i], taken)]
        if not fitting:
            return None
        if strategy == "PACK":
            node = max(fitting, key=lambda n: (count.get(n, 0), sum(free[n].values())))
        else:
            node = min(fitting, key=lambda n: (count.get(n, 0), -sum(free[n].values())))
        take(node, bundles[i], taken)
        count[node] = count.get(node, 0) + 1
        out[i] = node
    return out


def _hold_max() -> float:
    """`HOLD_MAX`, or ``BEAMLET_SPILLBACK_HOLD_MAX`` (seconds) if set."""
    return _seconds("BEAMLET_SPILLBACK_HOLD_MAX", HOLD_MAX)


def _locality_wait() -> float:
    """`LOCALITY_WAIT`, or ``BEAMLET_LOCALITY_WAIT`` (seconds) if set."""
    return _seconds("BEAMLET_LOCALITY_WAIT", LOCALITY_WAIT)


def _seconds(variable: str, default: float) -> float:
    value = os.environ.get(variable)
    if value is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"{variable} must be a positive number of seconds, got {value!r}")
    return seconds


class ClusterScheduler(Scheduler):
    """Places specs on the cluster's nodes; results arrive in the driver's store."""

    def __init__(self, backend: "ClusterBackend", nodes: list[NodeLink]):
        self.backend = backend
        self.store = backend.object_store
        self.tables = None  # set by the backend once it has the control store
        self.nodes = nodes
        self.lock = threading.RLock()
        self.tasks: dict[bytes, tuple[TaskSpec, NodeLink, set]] = {}  # id -> spec, node, returns left
        self.producer: dict[bytes, bytes] = {}  # return id -> task id
        self.actor_node: dict[bytes, NodeLink] = {}
        self.actor_spec: dict[bytes, TaskSpec] = {}  # actor id -> its creation, while placed
        self.token_actor: dict[bytes, bytes] = {}  # actor token (creation's return id) -> id
        self.restarts_left: dict[bytes, int] = {}  # actor id -> restarts left, once restarted
        self.token_node: dict[bytes, NodeLink] = {}
        self.remote: dict[bytes, RemoteEntry] = {}  # objects held on nodes
        #: remote object -> the task that made it, whose arguments are kept
        #: (counted) while it lives, to run it again if the object is lost.
        self.lineage: dict[bytes, TaskSpec] = {}
        #: task id -> (node id, soft): where a NodeAffinitySchedulingStrategy
        #: pins it (taken out of its request at submit), while it is placed.
        self.pins: dict[bytes, tuple[str, bool]] = {}
        #: A streaming generator call's item-id prefix -> [its spec, items
        #: delivered], while it runs: a retry elsewhere skips those.
        self.streams: dict[bytes, list] = {}
        #: The id prefixes of a running stream's consumer signals (acknowledgements,
        #: the closed mark) -> the waiters of the nodes' fetches of them (a
        #: producer held back asks for several; the rest are withdrawn at its end).
        self.signal_fetches: dict[bytes, list] = {}
        #: Placement groups (key -> _Group), and the keys of those waiting for
        #: room, oldest first; actor id -> the group whose room its creation
        #: waits for (its calls wait there too).
        self.groups: dict[str, _Group] = {}
        self.groups_pending: list[str] = []
        self.actor_group: dict[bytes, _Group] = {}
        #: A ``pg.ready()`` ref -> the store's waiter that gives it the group's
        #: ready value, until it does, or the ref is let go of.
        self.ready_waiters: dict[bytes, object] = {}
        #: time.time() - time.perf_counter(): the nodes' progress times (epoch)
        #: as this process's perf_counter times (see TaskEvents).
        self._clock = time.time() - time.perf_counter()
        #: Spillback: tasks no node can take yet (see `NodeLink.can_take`), in
        #: submission order per request (resources and pin), by task id, and the
        #: task id of each of their returns; and submissions never to be held.
        self.held: dict[tuple, collections.deque] = {}
        self.held_tasks: dict[bytes, TaskSpec] = {}
        self.held_returns: dict[bytes, bytes] = {}
        self.unheld: set[bytes] = set()
        #: Direct calls cancelled over their channel (``direct.py``), until
        #: answered there: their end is told as CANCELLED if they failed (a
        #: node's own calls' end is told by the node, which never sees a
        #: direct call's cancel).
        self.cancelled_calls: set[bytes] = set()
        #: Held tasks whose large arguments are on a node (the one holding the
        #: most of their bytes): node -> [(until when they wait for it, shape,
        #: spec)], in order; past that, they join `held` (see `_hold`).
        self.held_near: dict[NodeLink, collections.deque] = {}
        self._releasing = False
        self.hold_max = HOLD_MAX  # (see `_hold_max`)
        self.locality_wait = LOCALITY_WAIT  # (see `_locality_wait`)
        self.closed = False

    # -- placement ----------------------------------------------------------------
    def submit(self, spec: TaskSpec) -> None:
        plugins.notify("beamlet_task_submitted", spec=spec)
        self._submit(spec)

    def _submit(self, spec: TaskSpec) -> None:
        with self.lock:
            if self.closed:
                raise exc.BackendError("beamlet has been shut down")
            if spec.kind == ACTOR_METHOD:
                node = self.actor_node.get(spec.actor_id)
                if node is None and self.actor_group:
                    group = self.actor_group.get(spec.actor_id)
                    if group is not None:  # (its creation waits for its group's room)
                        group.waiting.append(spec)
                        return
                if node is None:
                    node = self._find_actor(spec.actor_id)
                if node is None or not node.alive:
                    self._fail(spec, exc.ActorDiedError(
                        f"the actor {spec.function_name} is dead: "
                        + ("its node died" if node is not None else
                           "it is unknown to this cluster")))
                    return
                hub = self.backend.direct
                if hub is not None and self._direct(spec, node, hub):
                    return
            else:
                if spec.placement_group is not None and self._waits_for_group(spec):
                    return
                resources, pin, soft = split_node_affinity(spec.resources)
                if pin is not None:
                    spec.resources = resources
                    self.pins[spec.task_id] = (pin, soft)
                hold = spec.kind == TASK and not self._discard_unheld(spec.task_id)
                shape = self._shape(spec) if hold and self.held else None
                if shape is not None and self.held.get(shape):
                    node = None  # (behind those of its kind held already)
                else:
                    try:
                        node = self._place(spec, hold)
                    except ValueError:
                        if self._waits_for_bundles(spec):
                            return
                        self.pins.pop(spec.task_id, None)
                        raise
                if spec.kind == ACTOR_CREATION:
                    self.actor_node[spec.actor_id] = node
                    self.actor_spec[spec.actor_id] = spec
                    self.token_actor[spec.return_ids[0]] = spec.actor_id
                    self.token_node[spec.return_ids[0]] = node
            if spec.generator is not None and spec.generator[0] == "streaming":
                stream_id = spec.return_ids[0]
                self.streams[stream_prefix(stream_id)] = [spec, 0]
                for signal in (ack_id(stream_id, 0), closed_id(stream_id)):
                    self.signal_fetches.setdefault(signal[:-8], [])
            if node is None:
                self._hold(spec, shape)  # (a stream is known from its submission: see _fail)
                return
            self._send(spec, node)

    def _place(self, spec: TaskSpec, hold: bool = False) -> NodeLink | None:
        """The node its NodeAffinitySchedulingStrategy names, else the least
        loaded alive node where the request fits; ValueError naming the
        resource if none ever could (or the pinned node if it is gone). With
        `hold`, only a node that can take it now (`NodeLink.can_take`), and
        None if there is none yet."""
        alive = [n for n in self.nodes if n.alive]
        pin = self.pins.get(spec.task_id)
        if pin is not None:
            node = next((n for n in alive if n.node_id == pin[0]), None)
            if node is not None and node.fits(spec.resources):
                if hold and not node.can_take(spec.resources, time.monotonic()):
                    return None
                return node
            if not pin[1]:
                raise ValueError(
                    f"{spec.display_name} is pinned to node {pin[0]} "
                    f"(NodeAffinitySchedulingStrategy(soft=False)), which "
                    + ("is not an alive node of the cluster" if node is None else
                       f"cannot hold its request {spec.resources}"))
        request = spec.resources
        fitting = [n for n in alive if n.fits(request)]
        if fitting:
            best = fitting[0] if len(fitting) == 1 else \
                min(fitting, key=lambda n: n.weight(request))
            if hold and not best.fits_now(request):  # (then none has room now:
                now = time.monotonic()  # one whose window has, if any)
                fitting = [n for n in fitting if len(n.extra) < n.window(now)]
                if not fitting:
                    return None
                best = min(fitting, key=lambda n: n.weight(request))
            return self._holder_of_arguments(spec, fitting) or best
        for name, amount in spec.resources.items():
            most = max((n.resources.get(name, 0) for n in alive), default=0)
            if most < amount:
                if not any(name in n.resources for n in alive):
                    raise ValueError(f"{spec.display_name} requests resource {name!r} "
                                     f"({amount}), which no alive node of the cluster has")
                raise ValueError(f"{spec.display_name} requests {amount} {name}, but no "
                                 f"alive node of the cluster has more than {most}: it could "
                                 f"never run")
        raise ValueError(f"{spec.display_name} fits no single alive node of the cluster "
                         f"({spec.resources})")

    # -- placement groups ------------------------------------------------------------
    def create_placement_group(self, info) -> None:
        """Reserve the bundles on the nodes as the strategy says, all at once,
        against what this driver has placed on them (or wait until they fit,
        trying again whenever something placed ends or a node joins);
        ValueError at once if they could never fit the alive nodes."""
        with self.lock:
            alive = [n for n in self.nodes if n.alive]
            if _assign(dict(enumerate(info.bundles)), info.strategy,
                       {n: dict(n.resources) for n in alive}) is None:
                raise ValueError(
                    f"placement group {info.pg_id.hex()} ({info.strategy}, bundles "
                    f"{list(info.bundles)}) could never be placed on the cluster's "
                    f"{len(alive)} alive node(s): "
                    + "; ".join(f"{n.node_id} has {n.resources}" for n in alive))
            group = self.groups[info.pg_id.hex()] = _Group(info)
            if not self._reserve_group(group):
                self.groups_pending.append(group.key)

    def placement_group_ready(self, ready_id: bytes):
        """A fresh ref for ``pg.ready()`` (Ray gives one per call): its value is
        the group's ready value (under `ready_id`) as soon as that is stored,
        at once if the group is ready now, else once it is reserved or, after
        losing bundles with a node, placed again (`_groups_lost` hides it
        meanwhile); an earlier one keeps its value."""
        ref = ObjectRef(new_id())
        fresh = ref.id
        refs = self.backend.refs

        def copy() -> None:
            self.ready_waiters.pop(fresh, None)
            entry = self.store.entry(ready_id)
            if entry is not None and refs.count(fresh):  # (else: let go of meanwhile)
                self.store.put_entry(fresh, entry)

        waiter = self.store.notify_when((ready_id,), 1, copy, broad=False)
        if waiter is not None:  # (withdrawn if the ref goes first: see `released`)
            self.ready_waiters[fresh] = waiter
        return ref

    def _free(self, node: NodeLink) -> dict[str, float]:
        return {k: v - node.load.get(k, 0) for k, v in node.resources.items()}

    def _reserve_group(self, group: _Group) -> bool:
        """Reserve its bundles not reserved yet (all; or those lost with a dead
        node, beside the others as its strategy says) if they fit now (whether
        they do), and send each node its share; the group is ready once every
        node with a new share says so. Under the lock."""
        bundles = group.info.bundles
        missing = {i: bundles[i] for i in range(len(bundles)) if i not in group.placed}
        if not missing:
            return True
        used: dict[NodeLink, int] = {}
        for node in group.placed.values():
            used[node] = used.get(node, 0) + 1
        placed = _assign(missing, group.info.strategy,
                         {n: self._free(n) for n in self.nodes if n.alive}, used)
        if placed is None:
            return False
        group.placed.update(placed)
        by_node: dict[NodeLink, list[int]] = {}
        for i, node in placed.items():
            by_node.setdefault(node, []).append(i)
            for k, v in bundles[i].items():
                node.load[k] = node.load.get(k, 0) + v
        for node, hosted in by_node.items():
            node.resources.update(group.resources_on(node))
            seed = group.info.ready_id + node.node_id.encode()
            ready_id = hashlib.blake2b(seed + group.shares.to_bytes(4, "little"),
                                       digest_size=len(group.info.ready_id)).digest()
            group.shares += 1
            for earlier in [r for r, where in group.node_ready.items() if where is node]:
                del group.node_ready[earlier]  # (the node answers for all under the new id)
            group.node_ready[ready_id] = node
            group.issued.append(ready_id)
            node.send(P.CreateGroup(dataclasses.replace(group.info, ready_id=ready_id),
                                    sorted(hosted)))
        self.store.cancel_waiter(group.waiter)
        ids = list(group.node_ready)
        group.waiter = self.store.notify_when(ids, len(ids),
                                              lambda: self._group_ready(group, ids), broad=False)
        waiting, group.waiting = group.waiting, []
        for spec in waiting:
            if spec.kind == ACTOR_CREATION:
                self.actor_group.pop(spec.actor_id, None)
                if spec.attempt and spec.actor_id not in self.actor_spec:
                    continue  # (a restart whose actor was let go of meanwhile)
            try:
                self._submit(spec)
            except ValueError as err:
                self._fail(spec, err)
        return True

    def _group_ready(self, group: _Group, ids: list) -> None:
        """Every node with a share of the group (`ids`: their ready ids)
        reserved it: the group is ready (its nodes' word on it, an error if
        one could not), CREATED in the tables first."""
        with self.lock:
            if self.groups.get(group.key) is not group or group.ready \
                    or not group.complete() or list(group.node_ready) != ids:
                return  # (removed, or a node died meanwhile: waited for again)
            answers = [self.store.entry(i) for i in ids]
            failed = next((a for a in answers if a is not None and a.is_error), None)
            group.ready = True
            group.node_ready = {}
            issued, group.issued = group.issued, []
            if failed is None:
                group.created = True
                self._set_group_state(group, "CREATED")
            self.store.put_entry(group.info.ready_id,
                                 failed if failed is not None else ready_value(group.info))
        self.store.delete(issued)

    def _set_group_state(self, group: _Group, state: str) -> None:
        if self.tables is not None:
            try:
                self.tables.set_placement_group_state(group.info.pg_id, state)
            except exc.BackendError:
                pass

    def _waits_for_group(self, spec: TaskSpec) -> bool:
        """Check a call in a placement group (ValueError if it could never run
        there); whether it waits for the group's room (then it is queued):
        none of its bundles is reserved, or not the one it asks for.
        Under the lock."""
        key = spec.placement_group[0].key
        group = self.groups.get(key)
        if group is None:
            raise ValueError(f"{spec.display_name} is scheduled in a placement group that "
                             f"was removed (or never existed here): it could never run")
        for name, amount in spec.resources.items():
            if name.endswith(key) and amount > group.capacity.get(name, 0) + 1e-9:
                raise ValueError(f"{spec.display_name} requests {amount} {name}, but its "
                                 f"placement group only has {group.capacity.get(name, 0)}: "
                                 f"it could never run")
        index = spec.placement_group[1]
        if group.placed and (index == -1 or index in group.placed):
            return False
        self._wait_in_group(group, spec)
        return True

    def _wait_in_group(self, group: _Group, spec: TaskSpec) -> None:
        group.waiting.append(spec)
        if spec.kind == ACTOR_CREATION:
            self.actor_group[spec.actor_id] = group

    def _waits_for_bundles(self, spec: TaskSpec) -> bool:
        """A call no node can take now (`_place` said so): if it is in a group
        some of whose bundles wait to be placed again (lost with their node),
        it waits for them, queued (whether it does). Under the lock."""
        if spec.placement_group is None:
            return False
        group = self.groups.get(spec.placement_group[0].key)
        if group is None or group.complete():
            return False
        if spec.kind == TASK:  # (a retry or a rebuild: never held once its bundle is back)
            self.unheld.add(spec.task_id)
        self._wait_in_group(group, spec)
        return True

    def _try_groups(self) -> None:
        """Reserve the waiting groups that fit now, oldest first (those placing
        bundles again after a node died come first). Under the lock."""
        for key in list(self.groups_pending):
            group = self.groups.get(key)
            if group is None or self._reserve_group(group):
                self.groups_pending.remove(key)

    def _groups_lost(self, dead: NodeLink) -> None:
        """`dead` died: the bundles it held are placed again on the alive nodes
        as each group's strategy says (STRICT_PACK moves them all; beside the
        group's other bundles otherwise), at once if they fit, else as soon as
        they do (something placed ends, a node joins): meanwhile the group is
        RESCHEDULING in the tables (PENDING if it was never ready) and its
        ready ref unresolved. What was placed in those bundles is placed again
        once they are (see `_waits_for_bundles`). Under the lock."""
        for group in list(self.groups.values()):
            lost = [i for i, node in group.placed.items() if node is dead]
            if not lost:
                continue
            for i in lost:
                del group.placed[i]
            for ready_id in [r for r, where in group.node_ready.items() if where is dead]:
                del group.node_ready[ready_id]
            self.store.cancel_waiter(group.waiter)
            group.waiter = None
            if group.ready:
                group.ready = False
                self.store.forget(group.info.ready_id)  # (pg.ready() waits again)
            self._set_group_state(group, "RESCHEDULING" if group.created else "PENDING")
            if self._reserve_group(group):
                continue
            if group.key not in self.groups_pending:
                self.groups_pending.insert(0, group.key)  # (first, as in Ray)
            alive = [n for n in self.nodes if n.alive]
            used = {n: 1 for n in group.placed.values()}
            if _assign({i: group.info.bundles[i] for i in lost}, group.info.strategy,
                       {n: dict(n.resources) for n in alive}, used) is None:
                print(f"beamlet: placement group {group.key} lost bundles {lost} with node "
                      f"{dead.node_id}, and no alive node can hold them: it waits for a "
                      f"node that can to join", file=sys.stderr, flush=True)

    def remove_placement_group(self, pg_id: bytes) -> None:
        """Give the bundles back (their nodes end what runs in them); what
        waits for the group fails; its ready ref holds an error if it was not ready."""
        with self.lock:
            group = self.groups.pop(pg_id.hex(), None)
            if group is None:
                return
            if group.key in self.groups_pending:
                self.groups_pending.remove(group.key)
            self.store.cancel_waiter(group.waiter)
            for node in set(group.placed.values()):
                for name in group.resources_on(node):
                    node.resources.pop(name, None)
                    node.load.pop(name, None)
                node.send(P.RemoveGroup(pg_id))
            for i, node in group.placed.items():
                for k, v in group.info.bundles[i].items():
                    node.load[k] = node.load.get(k, 0) - v
            removed = exc.TaskPlacementGroupRemoved(
                f"the placement group {group.key} the task was scheduled in was removed")
            dead = exc.ActorDiedError("the actor cannot run: its placement group was removed")
            for spec in group.waiting:
                if spec.kind == ACTOR_CREATION:
                    self.actor_group.pop(spec.actor_id, None)
                self.unheld.discard(spec.task_id)
                self._fail(spec, removed if spec.kind == TASK else dead)
            group.waiting = []
            for spec in [s for s in self.held_tasks.values()
                         if s.placement_group is not None
                         and s.placement_group[0].key == group.key]:
                self._unhold(spec)  # (left in its queue: skipped as cancelled)
                self._fail(spec, removed)
            ready, group.ready = group.ready, True
            self.store.delete(group.issued)
            self._try_groups()
            if self.held or self.held_near:
                self._release_held()  # (its reserved resources are free again)
        if not ready:
            self.store.put_entry(group.info.ready_id, removed_value(group.info))

    def _discard_unheld(self, task_id: bytes) -> bool:
        if task_id in self.unheld:
            self.unheld.discard(task_id)
            return True
        return False

    def _shape(self, spec: TaskSpec) -> tuple:
        return tuple(sorted(spec.resources.items())), self.pins.get(spec.task_id)

    def _hold(self, spec: TaskSpec, shape: tuple | None = None) -> None:
        """Keep a task until a node can take it (`_release_held`). One whose
        large arguments are on a node waits for that node first (the first
        node to have room is not it), as long as `locality_wait`: then any
        node may take it, in order with the others of its request (`tick`).
        Under the lock."""
        if shape is None:
            shape = self._shape(spec)
        near = None
        if self.remote and shape[1] is None and (spec.args or spec.kwargs):
            near = self._holder_of_arguments(
                spec, [n for n in self.nodes if n.alive and n.fits(spec.resources)], room=False)
        if near is not None:
            queue = self.held_near.get(near)
            if queue is None:
                queue = self.held_near[near] = collections.deque()
            queue.append((time.monotonic() + self.locality_wait, shape, spec))
        else:
            queue = self.held.get(shape)
            if queue is None:
                queue = self.held[shape] = collections.deque()
            queue.append(spec)
        self.held_tasks[spec.task_id] = spec
        for rid in spec.return_ids:
            self.held_returns[rid] = spec.task_id

    def _unhold(self, spec: TaskSpec) -> None:
        self.held_tasks.pop(spec.task_id, None)
        for rid in spec.return_ids:
            self.held_returns.pop(rid, None)

    def _release_held(self) -> None:
        """Send held tasks to the nodes that can take them now, in order per
        request; fail those no alive node could ever run. Under the lock."""
        if self._releasing or self.closed:
            return
        self._releasing = True
        try:
            if self.held_near:
                now = time.monotonic()
                for node in list(self.held_near):
                    if node.alive:
                        self._release_near(node, now)
                    else:  # (what it held is gone: any node may take them)
                        self._unhold_near(node, None)
            for shape, queue in list(self.held.items()):
                while queue:
                    spec = queue[0]
                    if spec.task_id not in self.held_tasks:  # (cancelled)
                        queue.popleft()
                        continue
                    try:
                        node = self._place(spec, hold=True)
                    except ValueError as err:
                        queue.popleft()
                        self._unhold(spec)
                        if not self._waits_for_bundles(spec):
                            self._fail(spec, exc.TaskError.from_exception(
                                err, spec.display_name))
                        continue
                    if node is None:
                        break
                    queue.popleft()
                    self._unhold(spec)
                    self._send(spec, node)
                if not queue:
                    del self.held[shape]
        finally:
            self._releasing = False

    def _release_to(self, node: NodeLink) -> None:
        """`node` has room again (something placed there ended, or it lends
        the CPUs of a blocked task): the held tasks it can take now go there,
        in order per request. (No other node could take any when it last
        changed: only a full `_release_held` looks at them all.) Under the lock."""
        if self._releasing or self.closed or not node.alive:
            return
        self._releasing = True
        try:
            if self.held_near and node in self.held_near:
                self._release_near(node, None)
            for shape, queue in list(self.held.items()):
                pin = shape[1]
                if pin is not None and pin[0] != node.node_id:
                    continue
                while queue and node.alive:  # (a send that fails kills it)
                    spec = queue[0]
                    if spec.task_id not in self.held_tasks:  # (cancelled)
                        queue.popleft()
                        continue
                    request = spec.resources
                    if not node.fits(request):
                        break
                    fits = node.fits_now(request)
                    if not fits and len(node.extra) >= max(node.finished):
                        break  # (its window, as the I/O thread last rolled it)
                    queue.popleft()
                    self._unhold(spec)
                    self._send(spec, node, fits)
                if not queue:
                    del self.held[shape]
        finally:
            self._releasing = False

    def _release_near(self, node: NodeLink, now: float | None) -> None:
        """Send `node` the held tasks waiting for it (their arguments are
        there) that it can take now, in order (`now`: roll its window first,
        else as the I/O thread last rolled it). Under the lock."""
        queue = self.held_near[node]
        while queue and node.alive:
            spec = queue[0][2]
            if spec.task_id not in self.held_tasks:  # (cancelled)
                queue.popleft()
                continue
            fits = node.fits_now(spec.resources)
            if not fits and len(node.extra) >= (max(node.finished) if now is None
                                                else node.window(now)):
                break
            queue.popleft()
            self._unhold(spec)
            self._send(spec, node, fits)
        if not queue:
            del self.held_near[node]

    def _unhold_near(self, node: NodeLink, now: float | None) -> bool:
        """The tasks waiting for `node` that waited long enough (all, if `now`
        is None) join the others held (ahead of them: they waited longest);
        whether any did. Under the lock."""
        queue = self.held_near[node]
        moved: dict[tuple, list] = {}
        while queue and (now is None or queue[0][0] <= now):
            _, shape, spec = queue.popleft()
            if spec.task_id in self.held_tasks:
                moved.setdefault(shape, []).append(spec)
        if not queue:
            del self.held_near[node]
        for shape, specs in moved.items():
            held = self.held.get(shape)
            if held is None:
                held = self.held[shape] = collections.deque()
            held.extendleft(reversed(specs))
        return bool(moved)

    def unstall(self) -> None:
        """(The I/O thread, now and then.) Held tasks whose nodes all finished
        nothing for `hold_max` seconds: the oldest of each request goes to the
        least loaded of them (its tasks may wait for what is held in a way
        their node cannot see: not in get or wait)."""
        with self.lock:
            if not self.held or self._releasing or self.closed:
                return
            now = time.monotonic()
            for node in self.nodes:
                if node.finished_total != node.stall_seen[0]:
                    node.stall_seen = (node.finished_total, now)
            for shape, queue in list(self.held.items()):
                while queue and queue[0].task_id not in self.held_tasks:
                    queue.popleft()
                if not queue:
                    del self.held[shape]
                    continue
                spec = queue[0]
                fitting = [n for n in self.nodes if n.alive and n.fits(spec.resources)]
                if any(now - n.stall_seen[1] < self.hold_max for n in fitting):
                    continue
                queue.popleft()
                self._unhold(spec)
                try:
                    node = self._place(spec)
                except ValueError as err:
                    if not self._waits_for_bundles(spec):
                        self._fail(spec, exc.TaskError.from_exception(err, spec.display_name))
                    continue
                node.stall_seen = (node.finished_total, now)  # (the next after another)
                self._send(spec, node)

    def _holder_of_arguments(self, spec: TaskSpec, fitting: list,
                             room: bool = True) -> NodeLink | None:
        """The fitting node, not full (with `room`), that holds the most bytes
        of the spec's arguments kept on nodes (None if none holds any): a task
        goes to its large arguments rather than they to it. Under the lock."""
        if not self.remote:
            return None
        held: dict = {}
        for object_id in spec.dependencies():
            remote = self.remote.get(object_id)
            if remote is not None:
                for node in remote.holders:
                    held[node] = held.get(node, 0) + remote.total_bytes
        ranked = sorted(((size, node) for node, size in held.items()
                         if node in fitting
                         and (not room or node.weight(spec.resources) <= 1)),
                        key=lambda pair: pair[0], reverse=True)
        return ranked[0][1] if ranked else None

    def _find_actor(self, actor_id: bytes) -> NodeLink | None:
        """An actor this driver did not create (get_actor): its node, from the table."""
        info = self.tables.actor(actor_id) if self.tables is not None else None
        if info is None or info.state is ActorState.DEAD or info.node_id is None:
            return None
        node = next((n for n in self.nodes if n.node_id == info.node_id), None)
        if node is not None:
            self.actor_node[actor_id] = node
        return node

    def _send(self, spec: TaskSpec, node: NodeLink, fits: bool | None = None) -> None:
        """Hand the spec to its node, with the values of its arguments we hold
        (`fits`: whether it fits beside what is placed there, if known)."""
        objects, locations = [], []
        for object_id in (dict.fromkeys(spec.dependencies()) if spec.args or spec.kwargs
                          else ()):
            remote = self.remote.get(object_id)
            if remote is not None:
                source = remote.source()
                if source is not None:
                    if node not in remote.holders:
                        locations.append((object_id, source.address))
                    continue
            entry = self.store.entry(object_id)
            if entry is not None and type(entry) is not RemoteEntry:
                objects.append((object_id, P.wire(entry)))
        self.tasks[spec.task_id] = (spec, node, set(spec.return_ids))
        for rid in spec.return_ids:
            self.producer[rid] = spec.task_id
        if spec.kind == TASK and not (node.fits_now(spec.resources) if fits is None else fits):
            node.extra.add(spec.task_id)
        node.placed[spec.task_id] = spec
        if spec.kind != ACTOR_METHOD:
            node.add(spec, 1)
        elif self.backend.direct is not None:
            channel = self.backend.direct.by_actor.get(spec.actor_id)
            if channel is not None:  # (calls through the node, that the channel waits for)
                rids = channel.node_rids
                rids.extend(spec.return_ids)
                if len(rids) > 64:
                    channel.node_rids = [r for r in rids if r in self.producer]
        if spec.kind == ACTOR_CREATION and self.tables is not None:
            self.tables.set_actor_state(spec.actor_id, ActorState.PENDING, node_id=node.node_id)
        try:
            node.conn.send(P.RunTask(spec, objects, locations))
        except ProtocolError as err:  # too large: it cannot go anywhere
            self._forget(spec, node)
            self._fail(spec, exc.ObjectStoreFullError(
                f"{spec.display_name} cannot be sent to a node: {err}"))
        except exc.BackendError:
            self._node_died(node)

    # -- direct channels (direct.py) --------------------------------------------------
    def _direct(self, spec: TaskSpec, node: NodeLink, hub: "D.DirectHub") -> bool:
        """(Under the lock.) Send an actor call over its actor's direct channel,
        or queue it there behind the calls in flight on it; False: it goes
        through the node (asking for a channel after `D.OPEN_AFTER` calls)."""
        actor_id = spec.actor_id
        channel = hub.by_actor.get(actor_id)
        if channel is None:
            count = hub.calls.get(actor_id, 0) + 1
            hub.calls[actor_id] = count
            if count >= D.OPEN_AFTER and \
                    time.monotonic() >= hub.closed_at.get(actor_id, 0.0):
                creation = self.actor_spec.get(actor_id)
                if creation is not None and creation.return_ids[0] in self.producer:
                    return False  # (still starting: its node would not ask its worker)
                hub.calls[actor_id] = 0
                hub.ask(actor_id, node, [rid for s in node.placed.values()
                                         if s.kind == ACTOR_METHOD and s.actor_id == actor_id
                                         for rid in s.return_ids])
            return False
        if channel.state != "open" or channel.node is not node:
            if channel.state == "opening" and \
                    time.monotonic() - channel.asked_at > D.OPEN_TIMEOUT:
                self.backend.direct_lost(channel)  # (never came: the node's path, for now)
            return False
        if channel.after or not D.eligible(spec):
            if channel.inflight or channel.after:
                channel.after.append(spec)  # (per-caller order: behind those in flight)
                return True
            return False
        if channel.node_rids:  # (not before the calls sent through the node are answered)
            producer = self.producer
            channel.node_rids = [r for r in channel.node_rids if r in producer]
            if channel.node_rids:
                return False
        data = D.pickle.dumps(("call", spec.fields(), D.call_tag(
            hub.key, channel.token, spec.task_id, spec.return_ids[0])), 5)
        if len(data) > D.CALL_MAX:
            return False
        task_id = spec.task_id
        self.tasks[task_id] = (spec, node, set(spec.return_ids))
        self.producer[spec.return_ids[0]] = task_id
        node.placed[task_id] = spec
        channel.inflight[task_id] = spec
        if self.task_progress is not None:
            self.task_progress((task_id, spec.attempt, RUNNING if len(channel.inflight) == 1
                                else "SUBMITTED_TO_WORKER", channel.pid, time.perf_counter()))
        channel.sent += 1
        try:
            hub.send(channel, data)  # (never blocks: the lock is held)
        except exc.BackendError:
            self.backend.direct_lost(channel)  # (the node answers it: DirectLost)
        return True

    def channel_making(self, object_id: bytes):
        """The direct channel whose call makes `object_id`, if any (a hint, read
        without the lock)."""
        task_id = self.producer.get(object_id)
        placed = self.tasks.get(task_id) if task_id is not None else None
        if placed is None or placed[0].kind != ACTOR_METHOD:
            return None
        channel = self.backend.direct.by_actor.get(placed[0].actor_id)
        if channel is not None and task_id in channel.inflight:
            return channel
        return None

    def direct_answered(self, channel, task_id: bytes, form, duration: float,
                        failed: bool) -> None:
        """A call's answer came over its channel: its result (`form`, a wire
        form), or None (``routed``: it comes through the node, which does not
        tell its end: the worker says here how long it took, and whether it
        `failed`)."""
        with self.lock:
            spec = channel.inflight.pop(task_id, None)
            if spec is None:
                return
            if not channel.inflight and (channel.after or channel.releases) \
                    and channel.state == "open":  # (closing: direct_lost drains it)
                self.direct_drained(channel)
            status = FINISHED
            if failed:
                status = FAILED
                if self.cancelled_calls and task_id in self.cancelled_calls:
                    self.cancelled_calls.discard(task_id)
                    status = CANCELLED
            elif self.cancelled_calls:
                self.cancelled_calls.discard(task_id)  # (it ended before the cancel came)
        plugins.notify("beamlet_task_finished", spec=spec, status=status, duration=duration,
                       pid=channel.pid)
        if form is not None:
            self.stored([(spec.return_ids[0], form)])

    def direct_drained(self, channel) -> None:
        """(Under the lock.) Nothing is in flight on the channel any more (or
        it was lost): the calls that waited for that are submitted again, in
        their order (to wherever the actor is now: through its node, or its
        restarted self), and the actor's token is let go of if its handle
        went meanwhile."""
        after, channel.after = channel.after, []
        releases, channel.releases = channel.releases, []
        node = channel.node
        for spec in after:
            try:
                self._submit(spec)
            except exc.BackendError as err:  # (shut down meanwhile)
                self._fail(spec, err)
        if releases and node.alive:
            node.send(P.Release(releases))

    def node_making(self, object_id: bytes) -> NodeLink | None:
        """The alive node running the task that returns `object_id`, if any
        (read without the lock: a stale answer only costs a wait elsewhere)."""
        task_id = self.producer.get(object_id)
        if task_id is None:
            return None
        placed = self.tasks.get(task_id)
        if placed is None or not placed[1].alive:
            return None
        return placed[1]

    def _restart(self, spec: TaskSpec, dead: NodeLink) -> bool:
        """Start an actor whose node died on another node, if restarts are left
        (``max_restarts``, -1: no limit). Under the lock."""
        left = self.restarts_left.get(spec.actor_id, spec.actor_options["max_restarts"])
        if left == 0 or spec.actor_id not in self.actor_spec:
            return False
        try:
            node = self._place(spec)
        except ValueError:
            node = None
        if node is None and not self._waits_for_bundles(spec):
            return False
        self.restarts_left[spec.actor_id] = left - 1 if left > 0 else left
        spec.attempt += 1
        token = spec.return_ids[0]
        if node is None:  # (it starts once its bundle is placed again; its calls wait)
            self.actor_node.pop(spec.actor_id, None)
        else:
            self.actor_node[spec.actor_id] = node
        if token in self.token_node:
            self.token_node[token] = node
        if self.tables is not None:
            try:
                self.tables.set_actor_state(spec.actor_id, ActorState.RESTARTING,
                                            f"its node {dead.node_id} died")
            except exc.BackendError:
                pass
        if node is not None:
            self._send(spec, node)
        return True

    def _forget(self, spec: TaskSpec, node: NodeLink) -> None:
        """The spec is not (or no longer) placed anywhere. Under the lock."""
        self.tasks.pop(spec.task_id, None)
        self.pins.pop(spec.task_id, None)
        for rid in spec.return_ids:
            self.producer.pop(rid, None)
        self._unplace(spec, node)

    def _fail(self, spec: TaskSpec, error: BaseException) -> None:
        self.pins.pop(spec.task_id, None)
        if spec.generator is not None and self.streams:
            self._stream_over(spec)
        sobj = serialize(error, is_error=True)
        for rid in spec.return_ids:
            self.store.put_entry(rid, sobj)

    # -- what nodes send (the backend's I/O thread) -------------------------------
    def stored(self, objects: list) -> None:
        """Results (or fetched objects) arrived."""
        for object_id, form in objects:
            if self.streams:
                self._streamed(object_id)
            self._arrived(object_id)
            self.store.put_entry(object_id, P.unwire(form))

    def _stream_over(self, spec: TaskSpec) -> None:
        """A streaming call ended: forget it, and withdraw the fetches of its
        consumer's signals still waiting (its producer needs none any more)."""
        stream_id = spec.return_ids[0]
        if self.streams.pop(stream_prefix(stream_id), None) is None:
            return
        for signal in (ack_id(stream_id, 0), closed_id(stream_id)):
            for waiter in self.signal_fetches.pop(signal[:-8], ()):
                self.store.cancel_waiter(waiter)

    def _streamed(self, object_id: bytes) -> None:
        """If it is an item of a running stream, count it delivered."""
        stream = self.streams.get(object_id[:-8])
        if stream is not None:
            stream[1] = max(stream[1], int.from_bytes(object_id[-8:], "little") + 1)

    def _arrived(self, object_id: bytes) -> TaskSpec | None:
        """A result is in: the task that made it, if this finished it."""
        with self.lock:
            task_id = self.producer.pop(object_id, None)
            if task_id is None:
                return None
            spec, node, left = self.tasks[task_id]
            left.discard(object_id)
            if not left:
                del self.tasks[task_id]
                if spec.generator is not None and self.streams:
                    self._stream_over(spec)
                if spec.kind != ACTOR_CREATION:
                    self._unplace(spec, node)
                    if self.pins:
                        self.pins.pop(task_id, None)
            return spec

    def located(self, node: NodeLink, objects: list, pulled: bool) -> None:
        """`node` holds these objects for us: results and objects its workers
        put (kept where they are), or copies it pulled."""
        for object_id, size, is_error, refs in objects:
            if self.streams and not pulled:
                self._streamed(object_id)
            with self.lock:
                remote = self.remote.get(object_id)
                if remote is not None:
                    if node not in remote.holders:
                        remote.holders.append(node)
                    continue
                if pulled:  # a copy of what we let go of meanwhile
                    node.send(P.Release([object_id]))
                    continue
                remote = self.remote[object_id] = RemoteEntry(size, is_error, refs)
                remote.holders.append(node)
            spec = self._arrived(object_id) if not pulled else None
            if spec is not None and spec.kind == TASK:
                self.backend.refs.incr_all(_lineage_refs(spec))
                with self.lock:
                    self.lineage[object_id] = spec
            self.store.put_entry(object_id, remote)
            if self.store.entry(object_id) is None:  # we had let go of it already
                self.released(object_id)

    def released(self, object_id: bytes) -> None:
        """Our last ref to an object is gone: every node with a copy lets go."""
        if self.ready_waiters:
            waiter = self.ready_waiters.pop(object_id, None)
            if waiter is not None:  # (a ``pg.ready()`` ref let go of before the group was)
                self.store.cancel_waiter(waiter)
        if object_id not in self.remote and object_id not in self.lineage:
            # (Most objects: a small result. Read without the lock: `located`
            # records a remote object before storing its entry, and looks
            # again, after, whether it was let go of meanwhile.)
            return
        with self.lock:
            remote = self.remote.pop(object_id, None)
        self._drop_lineage(object_id)
        if remote is not None:
            for node in remote.holders:
                if node.alive:
                    node.send(P.Release([object_id]))

    def _drop_lineage(self, object_id: bytes) -> None:
        """Forget how the object was made: its task's arguments may go."""
        with self.lock:
            spec = self.lineage.pop(object_id, None)
        if spec is not None:
            self.backend.refs.decr_all(_lineage_refs(spec))

    def _objects_lost(self, dead: NodeLink) -> None:
        """`dead` died: each object only it held is made again from lineage, or
        becomes an ObjectLostError. Under the lock."""
        lost = []
        for object_id, remote in self.remote.items():
            if dead in remote.holders:
                remote.holders.remove(dead)
                if not remote.holders:
                    lost.append(object_id)
        rebuilding: set[bytes] = set()
        for object_id in lost:
            self._rebuild(object_id, rebuilding, dead)

    def _rebuild(self, object_id: bytes, rebuilding: set, dead: NodeLink) -> bool:
        """Run again the task that made a lost object (and, first, those of its
        lost arguments); else store ObjectLostError for it. Whether it will be
        made again. Under the lock."""
        if object_id in rebuilding or object_id in self.producer:
            return True
        spec = self.lineage.get(object_id)
        self.remote.pop(object_id, None)
        entry = self.store.entry(object_id)
        if entry is not None and type(entry) is not RemoteEntry:
            self._drop_lineage(object_id)
            return True  # the driver has a copy of its own: that one lives on
        why = None
        if spec is None:
            why = "it cannot be made again (it was put there, or is an actor's result)"
        elif not may_retry(spec):
            why = f"its task cannot be run again (max_retries={spec.max_retries})"
        else:
            for dep in dict.fromkeys(spec.dependencies()):
                if dep in self.remote and self.remote[dep].holders:
                    continue
                if dep in self.lineage and self._rebuild(dep, rebuilding, dead):
                    continue
                if self.store.entry(dep) is None:
                    why = f"an argument of its task, {dep.hex()}, is gone too"
                    break
        if why is not None:
            self._drop_lineage(object_id)
            error = exc.ObjectLostError(f"object {object_id.hex()} was lost with node "
                                        f"{dead.node_id}, and {why}")
            self.store.replace(object_id, serialize(error, is_error=True))
            return False
        rebuilding.update(spec.return_ids)
        for rid in spec.return_ids:
            if type(self.store.entry(rid)) is RemoteEntry:
                self.store.forget(rid)
                self.remote.pop(rid, None)
        spec.attempt += 1
        try:
            self._send(spec, self._place(spec))
        except ValueError as err:
            if self._waits_for_bundles(spec):
                return True
            self._fail(spec, exc.ObjectLostError(
                f"object {object_id.hex()} was lost with node {dead.node_id}, and no node "
                f"can run its task again: {err}"))
        return True

    def _skip_delivered(self, spec: TaskSpec) -> None:
        """A streaming call runs again: the items it delivered are not sent again
        (as the node's scheduler does for a retry on one node). Under the lock."""
        if spec.generator is not None and spec.generator[0] == "streaming":
            stream = self.streams.get(stream_prefix(spec.return_ids[0]))
            if stream is not None and stream[1]:
                spec.generator = spec.generator[:2] + (stream[1],)

    def _unplace(self, spec: TaskSpec, node: NodeLink) -> None:
        """`spec` holds nothing on `node` any more: held tasks may go. Under the lock."""
        if node.placed.pop(spec.task_id, None) is not None and spec.kind != ACTOR_METHOD:
            if node.lent:
                node.lend(spec, False)
            node.add(spec, -1)
            if spec.kind == TASK:
                node.extra.discard(spec.task_id)
                node.finished[1] += 1  # (periods roll in `tick`, and in `window`)
                node.finished_total += 1
            if self.groups_pending:
                self._try_groups()
            if self.held or self.held_near:
                self._release_to(node)

    def fetch(self, node: NodeLink, object_ids: list) -> None:
        """A node needs these objects: send each once we have it."""
        def send(object_id: bytes, again: bool = False) -> None:
            remote = self.remote.get(object_id)
            source = remote.source() if remote is not None else None
            if source is not None:
                node.send(P.Locations([(object_id, source.address)]))
                return
            entry = self.store.entry(object_id)
            if entry is None and object_id in self.producer and not again:
                # Being made (again): send it once it is in (or, if the store says
                # so at once, it was let go of meanwhile: then the error below).
                self.store.on_ready(object_id, lambda i: send(i, True))
                return
            if entry is None or type(entry) is RemoteEntry:
                if self.store.closed:
                    return
                entry = serialize(exc.ObjectLostError(
                    f"object {object_id.hex()} was freed by its owner"), is_error=True)
            try:
                P.send_object(node.conn, object_id, entry)
            except exc.BackendError:
                pass  # the node is gone (the I/O thread sees it)

        for object_id in object_ids:
            fetches = self.signal_fetches.get(object_id[:-8]) if self.signal_fetches else None
            if fetches is None:
                self.store.on_ready(object_id, send)
            else:  # (a stream's signal: withdrawn at its end if it never comes)
                waiter = self.store.notify_when((object_id,), 1,
                                                lambda i=object_id: send(i), broad=False)
                if waiter is not None:
                    fetches.append(waiter)

    def nested(self, spec: TaskSpec, objects: list) -> None:
        """A worker's submission, forwarded by its node: accept it as ours."""
        for object_id, form in objects:
            if not self.store.contains(object_id):
                self.store.put_entry(object_id, P.unwire(form))
        with self.lock:
            self.unheld.add(spec.task_id)  # (its parent may wait for it: never held)
        try:
            self.backend.runtime.accept(spec)
        except Exception as err:  # noqa: BLE001 - the submitter gets it from get()
            with self.lock:
                self.unheld.discard(spec.task_id)
            self._fail(spec, exc.TaskError.from_exception(err, spec.display_name))

    def borrow(self, node: NodeLink, added: list, released: list) -> None:
        """`node`'s workers hold refs to `added` now, and to `released` no more:
        it counts as one holder of each (until it lets go, or dies)."""
        refs = self.backend.refs
        with self.lock:
            if not node.alive:
                return
            added = [i for i in added if i not in node.borrowed]
            node.borrowed.update(added)
            released = [i for i in released if i in node.borrowed]
            node.borrowed.difference_update(released)
        refs.incr_all(added)
        refs.decr_all(released)

    def report(self, node: NodeLink, events: list) -> None:
        """What `node`'s scheduler told of our tasks (before their results)."""
        progress = self.task_progress
        for event in events:
            kind = type(event)
            if kind is P.TaskProgress:
                if progress is not None:  # (for the task record)
                    task_id, attempt, state, pid, when = event
                    progress((task_id, attempt, state, pid, when - self._clock))
            elif kind is P.TaskFinished:
                self.task_finished(event)
            elif kind is P.Lent:
                self.lent(node, event.task_id, event.lent)

    def lent(self, node: NodeLink, task_id: bytes, lent: bool) -> None:
        """`node` lent out the CPUs of our task or actor (`task_id`: the actor's
        creation) while it waits in get or wait, or took them back: held
        tasks may go there meanwhile."""
        with self.lock:
            spec = node.placed.get(task_id)
            if spec is None or not node.alive or not node.lend(spec, lent):
                return
            if lent and (self.held or self.held_near):
                self._release_to(node)

    def tick(self, now: float) -> None:
        """(The I/O thread, every `WINDOW_PERIOD` or so.) Each node's window
        moves on to the next period (see `NodeLink.window`); held tasks that
        waited long enough for the node with their arguments (`_hold`) may go
        to any node."""
        with self.lock:
            for node in self.nodes:
                node.window(now)
            if self.held_near:
                moved = False
                for node in list(self.held_near):
                    moved |= self._unhold_near(node, now if node.alive else None)
                if moved:
                    self._release_held()

    def task_finished(self, event: "P.TaskFinished") -> None:
        """An attempt of our task ended on its node: the driver's observers hear
        of it, as on the local backend (before its results arrive)."""
        with self.lock:
            entry = self.tasks.get(event.task_id)
        if entry is None:
            return
        spec = entry[0]
        spec.attempt = event.attempt
        plugins.notify("beamlet_task_finished", spec=spec, status=event.status,
                       duration=event.duration, pid=event.pid)

    def actor_state(self, event: "P.ActorState") -> None:
        """Our actor changed state on its node: observers hear of it; a dead
        one's resources are free on its node at once (not when its handle goes)."""
        if event.state == ActorState.DEAD.value:
            with self.lock:
                self._actor_ended(event.actor_id)
        plugins.notify("beamlet_actor_state", actor_id=event.actor_id,
                       class_name=event.class_name, state=event.state, reason=event.reason)

    def owner_died(self, object_ids: list, reason: str) -> None:
        """The worker (an actor) that put these objects on a node died: they die
        with it, here too (OwnerDiedError), as on the local backend."""
        sobj = serialize(exc.OwnerDiedError(reason), is_error=True)
        for object_id in object_ids:
            with self.lock:
                self.remote.pop(object_id, None)
            self.store.replace(object_id, sobj)

    def _node_died(self, node: NodeLink) -> None:
        """Retry its tasks elsewhere or fail them; its actors are dead."""
        with self.lock:
            if not node.alive:
                return
            node.alive = False
            borrowed, node.borrowed = list(node.borrowed), set()
            self._groups_lost(node)
            self._objects_lost(node)  # (first: a retried task may need one made again)
            placed, node.placed = list(node.placed.values()), {}
            node.load = {}
            node.extra = set()
            node.lent = set()
            for spec in placed:
                self.tasks.pop(spec.task_id, None)
                for rid in spec.return_ids:
                    self.producer.pop(rid, None)
                if spec.kind == TASK and may_retry(spec):
                    spec.attempt += 1
                    self._skip_delivered(spec)
                    try:
                        self._send(spec, self._place(spec))
                        continue
                    except ValueError as err:
                        if self._waits_for_bundles(spec):
                            continue  # (its bundle is placed again: it runs there)
                        self._fail(spec, exc.WorkerCrashedError(
                            f"the node running {spec.display_name} ({node.node_id}) died, "
                            f"and no other node can run it: {err}"))
                        continue
                if spec.kind == TASK:
                    self._fail(spec, exc.WorkerCrashedError(
                        f"the node running {spec.display_name} ({node.node_id} at "
                        f"{node.address}) died; it was tried {spec.attempt + 1} time(s) "
                        f"(max_retries={spec.max_retries})"))
                elif spec.kind == ACTOR_CREATION and self._restart(spec, node):
                    continue
                elif spec.kind == ACTOR_METHOD and self.actor_node.get(spec.actor_id) \
                        is not node:  # (its actor restarts elsewhere)
                    self._fail(spec, exc.ActorUnavailableError(
                        f"the actor {spec.function_name.rsplit('.', 1)[0]} died with its "
                        f"node during this call and is restarting on another; the call may "
                        f"or may not have run"))
                else:
                    self._fail(spec, exc.ActorDiedError(
                        f"the actor {spec.function_name} is dead: its node {node.node_id} "
                        f"died"))
            for actor_id, where in list(self.actor_node.items()):
                if where is not node:
                    continue  # (alive elsewhere, or restarted just above)
                self.actor_spec.pop(actor_id, None)
                if self.tables is not None:
                    try:
                        self.tables.set_actor_state(actor_id, ActorState.DEAD,
                                                    f"its node {node.node_id} died")
                    except exc.BackendError:
                        pass
            hub = self.backend.direct
            if hub is not None:  # (after the restarts: the calls behind go where it is now)
                for channel in [c for c in hub.by_actor.values() if c.node is node]:
                    self.backend.direct_lost(channel)
            if self.held or self.held_near:
                self._release_held()  # (what only it could run fails)
        self.backend.node_died(node)
        self.backend.refs.decr_all(borrowed)  # (its workers hold nothing any more)

    # -- Scheduler ---------------------------------------------------------------
    def cancel(self, object_id: bytes, force: bool = False, recursive: bool = True) -> None:
        """Cancel on its node; with `recursive`, that node cancels the children
        it runs too and names the others (``CancelChildren``), which are
        cancelled where they run (`cancel_children`). An actor call's children
        are known to its worker, which cancels them through its node
        (``Worker.cancel_children``), told by its node or, for a direct call
        in flight, over the channel."""
        cancelled = None
        with self.lock:
            task_id = self.producer.get(object_id)
            entry = self.tasks.get(task_id) if task_id is not None else None
            if entry is None:
                held = self.held_tasks.get(self.held_returns.get(object_id, b""))
                if held is not None:  # (not sent yet: it never runs)
                    self._unhold(held)
                    self._fail(held, exc.TaskCancelledError(
                        f"task {held.display_name} was cancelled"))
            if entry is None and self.backend.direct is not None:
                for channel in self.backend.direct.by_actor.values():
                    queued = next((s for s in channel.after if object_id in s.return_ids),
                                  None)
                    if queued is not None:
                        if force:
                            raise ValueError("force=True is not supported for actor calls; "
                                             "use kill()")
                        channel.after.remove(queued)
                        self._fail(queued, exc.TaskCancelledError(
                            f"task {queued.display_name} was cancelled"))
                        cancelled = queued
                        break
        if cancelled is not None:  # (never sent: its end is told here)
            plugins.notify("beamlet_task_finished", spec=cancelled, status=CANCELLED,
                           duration=0.0, pid=None)
        if entry is None:
            return
        spec, node, _ = entry
        if spec.kind == ACTOR_CREATION:
            raise ValueError("cancel() cannot cancel an actor's creation; use kill()")
        if spec.kind == ACTOR_METHOD and force:
            raise ValueError("force=True is not supported for actor calls; use kill()")
        if spec.kind == ACTOR_METHOD and self.backend.direct is not None:
            channel = self.backend.direct.by_actor.get(spec.actor_id)
            if channel is not None and spec.task_id in channel.inflight:
                with self.lock:
                    self.cancelled_calls.add(spec.task_id)
                try:
                    self.backend.direct.send(channel, D.pickle.dumps(
                        ("cancel", spec.task_id, bool(recursive)), 5))
                except exc.BackendError:
                    self.backend.direct_lost(channel)  # (the node answers it: DirectLost)
                return
        node.send(P.CancelTask(object_id, force, recursive))

    def cancel_children(self, object_ids: list, force: bool) -> None:
        """A node cancelled a task whose children (these) it does not run."""
        for object_id in object_ids:
            try:
                self.cancel(object_id, force, True)
            except ValueError:
                pass  # (not a task: children are tasks, but a node's word is not checked)

    def kill_actor(self, actor_id: bytes, no_restart: bool = True) -> None:
        with self.lock:
            node = self.actor_node.get(actor_id) or self._find_actor(actor_id)
            if no_restart:
                self._actor_ended(actor_id)
        if node is not None and node.alive:
            node.send(P.KillActor(actor_id, no_restart))
        hub = self.backend.direct
        channel = hub.by_actor.get(actor_id) if hub is not None else None
        if channel is not None:  # (its later calls go behind the kill, through the node)
            self.backend.direct_lost(channel)

    def _actor_ended(self, actor_id: bytes) -> None:
        """Its resources are free on its node (for placement). Under the lock."""
        spec = self.actor_spec.pop(actor_id, None)
        node = self.actor_node.get(actor_id)
        if spec is not None:
            self.pins.pop(spec.task_id, None)
            if node is not None:
                self._unplace(spec, node)

    def release_token(self, object_id: bytes) -> None:
        with self.lock:
            node = self.token_node.pop(object_id, None)
            actor_id = self.token_actor.pop(object_id, b"")
            spec = self.actor_spec.get(actor_id)
            if spec is not None and not spec.actor_options.get("detached"):
                self._actor_ended(spec.actor_id)
            hub = self.backend.direct
            if hub is not None:
                hub.forget(actor_id)
                channel = hub.by_actor.get(actor_id)
                if channel is not None and (channel.inflight or channel.after):
                    channel.releases.append(object_id)  # (its node ends it once idle)
                    return
        if node is not None and node.alive:
            node.send(P.Release([object_id]))

    def total_resources(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for node in self.nodes:
            if node.alive:
                for k, v in node.resources.items():
                    total[k] = total.get(k, 0) + v
        return total

    def available_resources(self) -> dict[str, float]:
        free = self.total_resources()
        with self.lock:
            for node in self.nodes:
                if node.alive:
                    for k, v in node.load.items():
                        if k in free:
                            free[k] = max(0.0, free[k] - v)
        return free

    def shutdown(self) -> None:
        with self.lock:
            self.closed = True


class ClusterBackend(Backend):
    """A driver of a cluster: its tasks and actors run on the cluster's nodes."""

    name = "cluster"
    parallel = True
    isolated = True
    zero_copy = False  # (results come over the network into the driver's memory)
    multi_node = True
    node_affinity = True
    streaming_generators = True
    concurrency_groups = True
    placement_groups = True
    task_events = True

    #: init() keywords of this backend, beyond the common ones.
    accepted_options = frozenset({"token"})
    #: What places its specs (a node's heir driver has its own: ``heir.py``).
    scheduler_class = ClusterScheduler
    #: Whether it opens direct channels to its actors' workers (``direct.py``;
    #: ``BEAMLET_DIRECT_CALLS`` turns them off); its `DirectHub` if it does.
    direct_calls = True
    direct: "D.DirectHub | None" = None

    def __init__(self, config: dict, runtime):
        from ...core.auth import AuthenticationError
        from .commands import resolve
        from .files import StateDir
        from .transport import ZmqTransport
        check_backend_options(config, self.accepted_options, self.name)
        for key in ("num_cpus", "num_gpus"):
            if config.get(key) is not None:
                raise ValueError(f"{key} cannot be given when connecting to a cluster: its "
                                 f"nodes were started with their resources")
        if config.get("resources"):
            raise ValueError("resources cannot be given when connecting to a cluster: its "
                             "nodes were started with their resources")
        hold_max = _hold_max()  # (a bad setting is an error before connecting)
        direct_calls = self.direct_calls and D.enabled()
        locality_wait = _locality_wait()
        address = config.get("address")
        state = StateDir()
        if address == "auto":
            cluster = state.cluster()
            if not cluster:
                raise exc.BackendError("init(address='auto') found no cluster started on this "
                                       "machine: start one with `beamlet start --head`")
            address = cluster["address"]
        token = config.get("token")
        if token is not None and not isinstance(token, str):
            raise TypeError(f"token must be the hex string `beamlet start --head` printed, "
                            f"got {type(token).__name__}")
        address, secret = resolve(address, token, state)
        self.runtime = runtime
        self.refs = runtime.refs
        self.worker_id = f"driver-{os.getpid()}"
        self.transport = ZmqTransport(secret, P.VERSION, codec=P.CODEC)
        self.object_store = ClusterObjectStore(self, runtime.refs)
        self._pulls: dict[bytes, _Pull] = {}
        self._pulls_lock = threading.Lock()
        self._buffers = BufferPool(PULL_BUFFERS_KEPT)
        self._links: list[NodeLink] = []
        self._closed = False
        self.control_store = None
        try:
            try:
                head = self.transport.connect(address, timeout=CONNECT_TIMEOUT)
            except AuthenticationError as err:
                raise AuthenticationError(f"the cluster at {address} refused this driver's "
                                          f"token (wrong token?): {err}") from None
            try:
                head.send(P.DriverJoin())
                reply = head.recv(timeout=CONNECT_TIMEOUT)
            finally:
                head.close()
            if type(reply) is not P.DriverAccepted:
                raise exc.BackendError(f"the head at {address} answered {P.describe(reply)} "
                                       f"to a driver's join")
            self.control_store = open_control_store(reply.control_store_url)
            hello = P.DriverHello(self.job_config())
            for info in reply.nodes:
                if info.get("state") != "ALIVE":
                    continue
                try:
                    conn = self.transport.connect(info["address"], timeout=CONNECT_TIMEOUT)
                except exc.BackendError as err:  # (dying, not yet declared dead)
                    if info.get("head"):
                        raise
                    print(f"beamlet: leaving out node {info['node_id']}, which does not "
                          f"answer: {err}", file=sys.stderr, flush=True)
                    continue
                link = NodeLink(info, conn)
                self._links.append(link)
                conn.send(hello)
                if info.get("head"):
                    self.node_id = info["node_id"]
            if not self._links:
                raise exc.BackendError(f"the cluster at {address} has no alive node")
            self.scheduler = self.scheduler_class(self, self._links)
            self.scheduler.hold_max = hold_max
            self.scheduler.locality_wait = locality_wait
            from ...core.tables import Tables
            self.scheduler.tables = Tables(self.control_store)
            self._wake_r, self._wake_w = os.pipe()
            self._ep = select.epoll()
            self._direct_fds: dict = {}  # a direct channel's descriptor -> the channel
            if direct_calls:
                from .transport import parse_address
                self.direct = D.DirectHub(secret, parse_address(address)[0],
                                          self._direct_opened, self.direct_lost)
            self._io = threading.Thread(target=self._io_loop, name="beamlet-cluster-io",
                                        daemon=True)
            self._io.start()
        except BaseException:
            self._close_links()
            raise

    @property
    def object_bytes_received(self) -> int:
        """Bytes of object values this driver received from nodes (results,
        fetched and pulled objects): what did not go node to node."""
        return sum(link.bytes_received for link in self._links)

    def job_config(self) -> dict:
        """What the nodes' workers run this job with: as the local driver's
        (LocalBackend.job_config), so that tasks see the job's metadata and
        their nested tasks and actors get its runtime_env and actor lifetime."""
        return {"job_id": self.runtime.job_id, "namespace": self.runtime.namespace,
                "sys_path": list(sys.path), "cwd": os.getcwd(),
                "runtime_env": self.runtime.runtime_env,
                "job_metadata": self.runtime.job_metadata,
                "default_actor_lifetime": self.runtime.default_actor_lifetime,
                # (its workers' nested calls are placed by this driver, on any node)
                "cluster": True,
                "streaming_generators": self.streaming_generators,
                # (the nodes report each attempt's progress and end, for the
                # driver's task record: batched with the results)
                "task_events": self.task_events}

    # -- the I/O thread: every node's messages ------------------------------------
    def _io_loop(self) -> None:
        # (A bare epoll: the selectors module's wrapper costs more Python per
        # wake-up than handling a result does.)
        ep = self._ep
        ep.register(self._wake_r, select.EPOLLIN)
        for link in self._links:
            ep.register(link.conn.fileno(), select.EPOLLIN)
        watched = set(self._links)
        next_look = time.monotonic() + NODES_POLL
        next_tick = next_unstall = 0.0
        try:
            sched = self.scheduler
            channels = self._direct_fds
            while not self._closed:
                ready = ep.poll(WINDOW_PERIOD)
                if channels:
                    for fd, _ in ready:
                        channel = channels.get(fd)
                        if channel is not None and channel.reading.acquire(False):
                            try:  # (else a get reads it: wait_on_direct)
                                self._drain_direct(channel)
                            finally:
                                channel.reading.release()
                now = time.monotonic()
                if now >= next_tick:  # (once per wake-up at most: not per task)
                    sched.tick(now)
                    next_tick = now + WINDOW_PERIOD
                    if sched.held and now >= next_unstall:
                        sched.unstall()
                        next_unstall = now + sched.hold_max / 4
                if now >= next_look:
                    for link in self._join_new_nodes():
                        ep.register(link.conn.fileno(), select.EPOLLIN)
                        watched.add(link)
                    next_look = time.monotonic() + NODES_POLL
                # (every link each turn: a closed connection may not wake its fd)
                for link in self._links:
                    if link.alive and link.reading.acquire(False):  # (else a get reads it)
                        try:
                            self._drain(link)
                        finally:
                            link.reading.release()
                    if not link.alive and link in watched:
                        # A dead node's descriptor stays readable: stop watching it.
                        with link.reading:
                            watched.discard(link)
                            try:
                                ep.unregister(link.conn.fileno())
                            except (OSError, ValueError):
                                pass
                            link.conn.close()
        finally:
            ep.close()

    def wait_on(self, link: NodeLink, arrived, timeout: float | None) -> bool:
        """Block a `get` of one object that `link`'s node is making (in the
        caller's thread) until `arrived` is set or `timeout` passes; whether it
        was set.

        Rather than sleep until the I/O thread reads the result and wakes us (a
        thread switch per call, and both threads then contend for the GIL),
        read that node's connection here, handling everything it sends as the
        I/O thread would (which leaves the connection alone meanwhile: one
        reader per connection, so its messages are still handled in order).
        Plain waiting when another thread reads it already, and once the node
        is dead (its tasks are retried elsewhere)."""
        until = None if timeout is None else time.monotonic() + timeout
        if link.reading.acquire(False):
            try:
                got = self._read_link(link, arrived, until)
            finally:
                link.reading.release()
            if got is not None:
                return got
        return arrived.wait(None if until is None else max(0.0, until - time.monotonic()))

    def _read_link(self, link: NodeLink, arrived, until: float | None) -> bool | None:
        """(`wait_on`, holding the link's reading lock.) True once `arrived` is
        set, False when `until` passes, None if the link died or closed."""
        if self._closed or not link.alive:
            return None
        try:
            fd = link.conn.fileno()
        except (OSError, ValueError):
            return None
        return self._read_here(fd, link.conn.wait, lambda: self._drain(link),
                               lambda: link.alive, arrived, until)

    def _read_here(self, fd: int, wait, drain, alive, arrived,
                   until: float | None) -> bool | None:
        """Read one connection (descriptor `fd`) in the caller's thread, the I/O
        thread not woken by it meanwhile: `drain()` whenever `wait(seconds)`
        says something came, until `arrived` is set (True), `until` passes
        (False), or `alive()` turns false or the backend closes (None)."""
        try:
            self._ep.modify(fd, 0)  # (the I/O thread is not woken by what we read)
        except (OSError, ValueError):
            return None
        try:
            while True:
                if arrived.wait(0):
                    return True
                if self._closed or not alive():
                    return None
                left = DIRECT_SLICE if until is None else min(DIRECT_SLICE,
                                                              until - time.monotonic())
                if left <= 0:
                    return False
                if wait(left):
                    drain()
        finally:
            try:
                self._ep.modify(fd, select.EPOLLIN)
            except (OSError, ValueError):
                pass  # (closed: the node died, or the channel was lost)

    # -- direct channels (direct.py) ------------------------------------------------
    def _direct_opened(self, channel, wire, pid: int) -> bool:
        """(The hub's acceptor thread.) The worker of `channel` connected and
        proved the key: calls may go over it (whether it was still wanted)."""
        with self.scheduler.lock:
            if self._closed or channel.state != "opening" or not channel.node.alive \
                    or self.direct.by_actor.get(channel.actor_id) is not channel:
                return False
            channel.wire, channel.pid, channel.state = wire, pid, "open"
            self.direct.failed.pop(channel.actor_id, None)
            self._direct_fds[wire.fileno()] = channel
            self._ep.register(wire.fileno(), select.EPOLLIN)
        return True

    def wait_on_direct(self, channel, arrived, timeout: float | None) -> bool:
        """`wait_on` for a call in flight on a direct channel: read the channel
        in the caller's thread until `arrived` is set or `timeout` passes."""
        until = None if timeout is None else time.monotonic() + timeout
        if channel.reading.acquire(False):
            try:
                got = None
                if channel.state == "open":
                    wire = channel.wire
                    got = self._read_here(wire.fileno(), wire.wait,
                                          lambda: self._drain_direct(channel),
                                          lambda: channel.state == "open", arrived, until)
            finally:
                channel.reading.release()
            if got is not None:
                return got
        return arrived.wait(None if until is None else max(0.0, until - time.monotonic()))

    def _drain_direct(self, channel) -> None:
        """Handle what came over a direct channel (holding its reading lock)."""
        if channel.state != "open":
            return
        try:
            messages = channel.wire.recv_all()
        except EOFError:
            self.direct_lost(channel)
            return
        except Exception as err:  # noqa: BLE001 - a broken channel is a lost one
            print(f"beamlet: closed the direct channel to actor {channel.actor_id.hex()}: "
                  f"{err}", file=sys.stderr, flush=True)
            self.direct_lost(channel)
            return
        if not self._direct_answers(channel, messages):
            self.direct_lost(channel)

    def _direct_answers(self, channel, messages: list) -> bool:
        """Handle answers that came over a direct channel; False (logged) if
        one is not an answer (then the channel must be closed)."""
        answered = self.scheduler.direct_answered
        for message in messages:
            try:
                tag = message[0] if type(message) is tuple and message else None
                if tag == "done" and len(message) == 4 and type(message[2]) is tuple \
                        and len(message[2]) == 4:
                    answered(channel, message[1], message[2], message[3], message[2][3])
                elif tag == "routed" and len(message) == 4:
                    answered(channel, message[1], None, message[2], message[3])
                else:
                    raise ProtocolError(f"a message that is not one of the direct "
                                        f"channel's: {P.describe(message)}")
            except Exception as err:  # noqa: BLE001 - a broken channel is a lost one
                print(f"beamlet: closed the direct channel to actor "
                      f"{channel.actor_id.hex()}: {err!r}", file=sys.stderr, flush=True)
                return False
        return True

    def _direct_read_last(self, channel) -> None:
        """(Under the lock, `channel` closing.) The answers that arrived on it
        and nobody read yet (the calls they answer are not lost), without
        blocking; none if another thread is reading it (it handles them)."""
        if not channel.reading.acquire(False):
            return
        try:
            until = time.monotonic() + 0.1
            while time.monotonic() < until:
                try:
                    messages = channel.wire.recv_all()
                except Exception:  # noqa: BLE001 - the end of it (EOF, or garbage)
                    return
                if not messages or not self._direct_answers(channel, messages):
                    return
        finally:
            channel.reading.release()

    def direct_lost(self, channel) -> None:
        """The channel closed (its worker died), broke, or never opened: the
        calls in flight on it go to its node (``DirectLost``, which answers them
        as a dead worker's calls), then those that waited behind them."""
        sched = self.scheduler
        hub = self.direct
        with sched.lock:
            if channel.state in ("closed", "closing"):
                return
            was_open = channel.state == "open"
            if was_open:
                channel.state = "closing"  # (no call goes on it; none drains it)
                self._direct_read_last(channel)
            channel.state = "closed"
            if hub.by_actor.get(channel.actor_id) is channel:
                del hub.by_actor[channel.actor_id]
            hub.pending.pop(channel.id, None)
            hub.lost(channel.actor_id, was_open)
            lost = [s for s in channel.inflight.values() if s.task_id in sched.tasks]
            if sched.cancelled_calls:  # (its node answers them, and tells their end)
                sched.cancelled_calls.difference_update(channel.inflight)
            channel.inflight.clear()
            node = channel.node
            if node.alive and not self._closed:  # (never opened: its node forgets it too)
                node.send(P.DirectLost(channel.token, [s.fields() for s in lost]))
            if not self._closed:
                sched.direct_drained(channel)
        wire = channel.wire
        if wire is not None:
            self._direct_fds.pop(wire.fileno(), None)
            try:
                self._ep.unregister(wire.fileno())
            except (OSError, ValueError):
                pass
            wire.close()

    def _join_new_nodes(self) -> list[NodeLink]:
        """Connect to the nodes that joined the cluster since we looked (the
        nodes table), so that they get work too. The new links (the I/O thread)."""
        try:
            infos = self.scheduler.tables.nodes()
        except exc.BackendError:
            return []  # (the control store is away: next time)
        known = {link.node_id for link in self._links}
        new = []
        for info in infos:
            if info.node_id in known or info.state != "ALIVE":
                continue
            try:
                conn = self.transport.connect(info.address, timeout=JOIN_TIMEOUT)
            except exc.BackendError:
                continue  # (dying, or not listening yet: next time)
            link = NodeLink({"node_id": info.node_id, "address": info.address,
                             "resources": info.resources}, conn)
            if not link.send(P.DriverHello(self.job_config())):
                conn.close()
                continue
            with self.scheduler.lock:
                self._links.append(link)  # (the scheduler's `nodes` too)
                self.scheduler._try_groups()  # (waiting groups may fit there)
                self.scheduler._release_held()  # (held tasks may go there)
            new.append(link)
        return new

    def _drain(self, link: NodeLink) -> None:
        try:
            messages = link.conn.recv_all()
        except EOFError:
            if not self._closed:
                print(f"beamlet: node {link.node_id} at {link.address} is gone",
                      file=sys.stderr, flush=True)
                self.scheduler._node_died(link)
            return
        except Exception as err:  # noqa: BLE001 - a broken node is a dead node
            print(f"beamlet: node {link.node_id} broke the protocol: {err}", file=sys.stderr,
                  flush=True)
            link.conn.close()
            self.scheduler._node_died(link)
            return
        sched = self.scheduler
        for message in messages:
            kind = type(message)
            if kind is Piece:
                message = as_chunk(message)  # (a piece of a pulled object)
                kind = type(message)
            if kind not in P.TO_DRIVER:
                print(f"beamlet: node {link.node_id} sent {P.describe(message)}, which is not "
                      f"for a driver: dropping it as broken", file=sys.stderr, flush=True)
                link.conn.close()
                sched._node_died(link)
                return
            try:
                if kind is P.Report or kind is P.Objects:  # (results: the usual messages)
                    if kind is P.Report:
                        sched.report(link, message.events)
                    objects = message[-1]
                    if objects:
                        link.bytes_received += _objects_bytes(objects)
                        sched.stored(objects)
                elif kind is P.Located:
                    sched.located(link, message.objects, message.pulled)
                elif kind is P.Chunk:
                    self._chunk(link, message)
                elif kind is P.Missing:
                    for object_id in message.object_ids:
                        self._pulled(object_id, serialize(exc.ObjectLostError(
                            f"object {object_id.hex()} is no longer on node {link.node_id}"),
                            is_error=True))
                elif kind is P.Fetch:
                    sched.fetch(link, message.object_ids)
                elif kind is P.NestedSubmit:
                    sched.nested(message.spec, message.objects)
                elif kind is P.CancelChildren:
                    sched.cancel_children(message.object_ids, message.force)
                elif kind is P.TaskFinished:
                    sched.task_finished(message)
                elif kind is P.ActorState:
                    sched.actor_state(message)
                elif kind is P.Borrow:
                    sched.borrow(link, message.added, message.released)
                elif kind is P.OwnerDied:
                    sched.owner_died(message.object_ids, message.reason)
            except Exception as err:  # noqa: BLE001 - one bad message must not stop the thread
                import traceback
                print(f"beamlet: error handling {kind.__name__} from node {link.node_id}: "
                      f"{err!r}\n{traceback.format_exc()}", file=sys.stderr, flush=True)

    # -- pulling objects held on nodes -------------------------------------------
    def pull(self, object_id: bytes, entry: RemoteEntry):
        """The value of a remote object, pulled from a node that holds it; None
        if that node died meanwhile (see ClusterObjectStore._materialize)."""
        with self._pulls_lock:
            pull = self._pulls.get(object_id)
            if pull is None:
                source = entry.source()
                if source is None:
                    return None
                pull = self._pulls[object_id] = _Pull(source)
                source.send(P.Pull([object_id]))  # (if it fails, the node is dying)
        while not pull.done.wait(0.5):
            if self._closed:
                raise exc.BackendError("beamlet has been shut down")
            if not pull.node.alive:
                break
        with self._pulls_lock:
            if self._pulls.get(object_id) is pull:
                del self._pulls[object_id]
        return pull.result

    def _chunk(self, link: NodeLink, chunk: P.Chunk) -> None:
        pull = self._pulls.get(chunk.object_id)
        if pull is None or pull.done.is_set():
            return
        if pull.assembly is None:
            pull.assembly = Assembly(self._buffers.take(chunk.total), chunk.total)
        link.bytes_received += chunk.data.nbytes
        if pull.assembly.add(chunk):
            assembly, pull.assembly = pull.assembly, None
            assembly.release()
            self._pulled(chunk.object_id, shm.object_from_view(assembly.target))

    def _pulled(self, object_id: bytes, sobj) -> None:
        pull = self._pulls.get(object_id)
        if pull is not None:
            pull.result = sobj
            pull.done.set()

    def node_died(self, node: NodeLink) -> None:
        """Pulls from a dead node end (their gets look again where the object is)."""
        with self._pulls_lock:
            for pull in self._pulls.values():
                if pull.node is node:
                    pull.done.set()

    # -- Backend -----------------------------------------------------------------
    def object_released(self, object_id: bytes) -> None:
        self.object_store.delete([object_id])
        self.scheduler.released(object_id)
        if object_id in self.scheduler.token_node:
            self.scheduler.release_token(object_id)

    def workers(self) -> list[dict]:
        """The driver, and the worker processes of every alive node (asked on
        a connection of its own, so the node's answer is not among its results)."""
        from ..local.inprocess import driver_worker_row
        rows = [driver_worker_row(self.worker_id)]
        for link in [n for n in self._links if n.alive]:
            try:
                conn = self.transport.connect(link.address, timeout=CONNECT_TIMEOUT)
                try:
                    conn.send(P.WorkersRequest())
                    reply = conn.recv(timeout=CONNECT_TIMEOUT)
                finally:
                    conn.close()
            except exc.BackendError as err:
                print(f"beamlet: the workers of node {link.node_id} are left out: {err}",
                      file=sys.stderr, flush=True)
                continue
            if type(reply) is P.WorkersReply:
                rows.extend(reply.workers)
        return rows

    def nodes(self) -> list[dict]:
        return [{"NodeID": n.node_id, "Alive": n.alive,
                 "NodeManagerAddress": n.address.rsplit(":", 1)[0],
                 "Resources": dict(n.resources)} for n in self._links]

    def _close_links(self) -> None:
        if self.direct is not None:
            self.direct.close()
        for link in self._links:
            link.conn.close()
        self.transport.close()
        if self.control_store is not None:
            self.control_store.close()

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.scheduler.shutdown()
        with self._pulls_lock:
            for pull in self._pulls.values():
                pull.done.set()
        os.write(self._wake_w, b"x")
        self._io.join(5)
        if self.direct is not None:
            self.direct.close()
            for channel in list(self._direct_fds.values()):
                channel.wire.close()
            self._direct_fds.clear()
        self.object_store.close()
        self._close_links()
        self._buffers.close()
        os.close(self._wake_r)
        os.close(self._wake_w)


def _lineage_refs(spec: TaskSpec) -> list:
    """What a task's rerun needs: its arguments, and the refs inside them."""
    return spec.dependencies() + spec.contained_refs()


def _objects_bytes(objects: list) -> int:
    """The bytes of the values of ``[(object_id, wire form)]``."""
    if len(objects) == 1:  # (a result: the usual case)
        return _wire_bytes(objects[0][1])
    return sum(_wire_bytes(form) for _, form in objects)


def _wire_bytes(form) -> int:
    data, buffers, _, _ = form
    if not buffers:
        return len(data)
    return len(data) + sum(memoryview(b).nbytes for b in buffers)
