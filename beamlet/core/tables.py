"""The control-store tables: what every process of a session shares about
functions, actors, actor names, nodes and object locations.

This module alone knows the tables' names, their keys and how their records
are encoded. Each read-modify-write is a compare-and-set retry loop (read the
value, compute the new one, `ControlStore.compare_and_set` it; on a conflict
read again), so processes sharing one store (the local backend's workers
through the driver, a cluster's nodes through Redis) never lose each other's
updates, and a name is never given to two actors.

The tables (key -> value):

    functions       function id -> the pickled function or class; written once
    actors          actor id -> ActorInfo
    named_actors    named_actor_key(namespace, name) -> actor id
    nodes           node id -> NodeInfo
    object_locations  object id -> the ids of the nodes holding a copy
    placement_groups  placement group id -> PlacementGroupInfo
    named_placement_groups  name -> placement group id
    job_actors      "<job id>:<actor id hex>" -> b"d" if detached, else b"" (for
                    backends whose actor records outlive the job: see end_job_actors)

Records are tuples of plain values (str, bytes, numbers, dicts, tuples, None)
pickled with a format number in front, and are read back with an unpickler
that refuses every global, so reading a record never runs code.
"""
from __future__ import annotations

import dataclasses
import enum
import io
import pickle
import random
import time
from typing import Callable

from .. import exceptions as exc
from .interfaces import ControlStore

FUNCTIONS = "functions"
ACTORS = "actors"
NAMED_ACTORS = "named_actors"
NODES = "nodes"
OBJECT_LOCATIONS = "object_locations"
PLACEMENT_GROUPS = "placement_groups"
NAMED_PLACEMENT_GROUPS = "named_placement_groups"
JOB_ACTORS = "job_actors"

#: Compare-and-set attempts a read-modify-write makes before it gives up.
MAX_ATTEMPTS = 100

_FORMAT = 1  # bump when a record's fields change
_KEEP = object()  # a change function's answer: leave the record as it is


class ActorState(enum.StrEnum):
    """An actor's lifecycle as the control store records it. DEAD is final."""

    PENDING = "PENDING"        # created; its constructor has not finished yet
    ALIVE = "ALIVE"
    RESTARTING = "RESTARTING"  # its process died; a new one is being started
    DEAD = "DEAD"


class NodeState(enum.StrEnum):
    """A node's state. DEAD is final: a node that comes back registers a new id."""

    ALIVE = "ALIVE"
    DEAD = "DEAD"


@dataclasses.dataclass(frozen=True)
class ActorInfo:
    """One row of the actors table."""

    actor_id: bytes
    class_name: str
    name: str | None
    namespace: str
    #: The creation task's return id: a handle holds a ref to it, which keeps the actor alive.
    ready_id: bytes
    #: method name -> {"num_returns", "is_async", "params", "backpressure"} (see
    #: actor._method_table), for handles made from the record.
    methods: dict
    state: ActorState = ActorState.PENDING
    reason: str = ""        # why it is RESTARTING or DEAD
    node_id: str | None = None  # the node it runs (or last ran) on

    def __post_init__(self):
        object.__setattr__(self, "state", ActorState(self.state))


@dataclasses.dataclass(frozen=True)
class NodeInfo:
    """One row of the nodes table."""

    node_id: str
    address: str
    resources: dict  # total resources: {"CPU": 2.0, "GPU": 0.0, ...}
    state: NodeState = NodeState.ALIVE
    heartbeat: float = 0.0  # time.time() of the node's last heartbeat

    def __post_init__(self):
        object.__setattr__(self, "state", NodeState(self.state))


@dataclasses.dataclass(frozen=True)
class PlacementGroupInfo:
    """One row of the placement_groups table. ``state`` is PENDING (waiting for
    its bundles to fit), CREATED (reserved), RESCHEDULING (created, then some
    bundles were lost with their node: they wait to be placed again) or
    REMOVED (final)."""

    pg_id: bytes
    name: str | None
    bundles: tuple  # of {resource: amount} dicts
    strategy: str
    state: str = "PENDING"
    ready_id: bytes = b""  # the object pg.ready() refers to


def _field_names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


_FIELDS = {ActorInfo: _field_names(ActorInfo), NodeInfo: _field_names(NodeInfo),
           PlacementGroupInfo: _field_names(PlacementGroupInfo)}


def _encode(values: tuple) -> bytes:
    return pickle.dumps((_FORMAT,) + values, protocol=5)


def _encode_record(record) -> bytes:
    values = tuple(getattr(record, name) for name in _FIELDS[type(record)])
    return _encode(tuple(v.value if isinstance(v, enum.Enum) else v for v in values))


class _PlainValues(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"a record may hold plain values only, not {module}.{name}")


def _decode(raw: bytes, table: str, key) -> tuple:
    try:
        values = _PlainValues(io.BytesIO(raw)).load()
    except Exception as err:  # noqa: BLE001 - any damage reads as the same error
        raise exc.BackendError(f"control store: {table}[{_show(key)}] holds no readable "
                               f"record ({type(err).__name__}: {err})") from None
    if type(values) is not tuple or not values or values[0] != _FORMAT:
        raise exc.BackendError(f"control store: {table}[{_show(key)}] was written in another "
                               f"record format (by another beamlet version?)")
    return values[1:]


def _decode_record(cls, raw: bytes | None, table: str, key):
    if raw is None:
        return None
    values = _decode(raw, table, key)
    try:
        return cls(*values)
    except (TypeError, ValueError) as err:
        raise exc.BackendError(f"control store: {table}[{_show(key)}] is not a valid "
                               f"{cls.__name__} ({err})") from None


def _show(key) -> str:
    return key.hex() if isinstance(key, bytes) and not key.isascii() else repr(key)


def named_actor_key(namespace: str, name: str) -> bytes:
    """The named_actors key of `name` in `namespace`; distinct pairs never share
    a key, whatever characters they contain."""
    ns = namespace.encode()
    return b"%d:%s:%s" % (len(ns), ns, name.encode())


def _backoff(attempt: int) -> None:
    """Spread out writers that keep colliding (on Redis, ones in other processes)."""
    if attempt:
        time.sleep(random.random() * min(0.01, 0.0001 * 2 ** attempt))


def _gave_up(table: str, key) -> exc.BackendError:
    return exc.BackendError(
        f"control store: could not update {table}[{_show(key)}]: other writers changed it "
        f"{MAX_ATTEMPTS} times in a row between a read and a compare-and-set")


class Tables:
    """The tables of one ControlStore. Stateless apart from the store, so any
    number of them (one per Runtime, one per scheduler) may share a store."""

    def __init__(self, store: ControlStore):
        self.store = store

    # -- the compare-and-set loop ------------------------------------------------
    def _update(self, table: str, key, change: Callable):
        """Replace the value `raw` at `key` by ``change(raw)`` atomically: bytes, None
        (delete) or _KEEP (leave it). Returns the value stored when it succeeded."""
        store = self.store
        for attempt in range(MAX_ATTEMPTS):
            old = store.get(table, key)
            new = change(old)
            if new is _KEEP:
                return old
            if store.compare_and_set(table, key, old, new):
                return new
            _backoff(attempt)
        raise _gave_up(table, key)

    def _update_record(self, table: str, cls, key, change: Callable):
        """`_update` on decoded records: ``change(record or None)`` returns the new
        record, None (delete) or _KEEP. Returns the record stored at the end."""
        seen = {}

        def raw_change(raw):
            seen["old"] = old = _decode_record(cls, raw, table, key)
            seen["new"] = new = change(old)
            return new if new is _KEEP or new is None else _encode_record(new)

        self._update(table, key, raw_change)
        return seen["old"] if seen["new"] is _KEEP else seen["new"]

    # -- functions ---------------------------------------------------------------
    def register_function(self, function_id: bytes, blob: bytes) -> None:
        """Store a pickled function or class under its id; the first write wins
        (an id is a digest of its blob, so every write of it is the same)."""
        self.store.compare_and_set(FUNCTIONS, function_id, None, blob)

    def function(self, function_id: bytes) -> bytes | None:
        """The pickled function or class, or None if it was never registered."""
        return self.store.get(FUNCTIONS, function_id)

    # -- actors ------------------------------------------------------------------
    def create_actor(self, info: ActorInfo) -> None:
        """Record a new actor and, if it has a name, claim the name for it.

        Raises ActorAlreadyExistsError (and records nothing) if a live actor
        holds the name. The record is written before the name is claimed, so
        that anyone who finds the name taken also finds its holder's record
        (PENDING, so live); a name whose holder has no record, or a DEAD one,
        is taken over."""
        if not self.store.compare_and_set(ACTORS, info.actor_id, None, _encode_record(info)):
            raise ValueError(f"actor {info.actor_id.hex()} is already recorded")
        if info.name is None:
            return
        try:
            self._claim_name(info.namespace, info.name, info.actor_id)
        except BaseException:
            self.store.delete(ACTORS, info.actor_id)
            raise

    def _claim_name(self, namespace: str, name: str, actor_id: bytes) -> None:
        store = self.store
        key = named_actor_key(namespace, name)
        for attempt in range(MAX_ATTEMPTS):
            if store.compare_and_set(NAMED_ACTORS, key, None, actor_id):
                return
            holder = store.get(NAMED_ACTORS, key)
            if holder is None:
                continue  # freed since the compare-and-set
            if holder == actor_id:
                return
            other = self.actor(holder)
            if other is not None and other.state is not ActorState.DEAD:
                raise exc.ActorAlreadyExistsError(
                    f"an actor named {name!r} already exists in namespace {namespace!r}")
            # The holder is dead: take the name over, unless someone else just did.
            if store.compare_and_set(NAMED_ACTORS, key, holder, actor_id):
                return
            _backoff(attempt)
        raise _gave_up(NAMED_ACTORS, key)

    def forget_actor(self, actor_id: bytes) -> None:
        """Remove the record and name of an actor whose creation was rejected
        before it was submitted (so no scheduler knows it)."""
        info = self.actor(actor_id)
        if info is None:
            return
        if info.name is not None:
            self.store.compare_and_set(NAMED_ACTORS, named_actor_key(info.namespace, info.name),
                                       actor_id, None)
        self.store.delete(ACTORS, actor_id)

    def actor(self, actor_id: bytes) -> ActorInfo | None:
        """The actor's record, or None if it was never recorded (or forgotten)."""
        return _decode_record(ActorInfo, self.store.get(ACTORS, actor_id), ACTORS, actor_id)

    def set_actor_state(self, actor_id: bytes, state: ActorState | str, reason: str = "",
                        node_id: str | None = None) -> ActorInfo | None:
        """Record the actor's new state (and the node it runs on, if given).
        DEAD is final: a dead actor's record is left as it is. A dead actor's
        name is freed for reuse. Returns the record as stored, None for an
        unknown actor."""
        state = ActorState(state)

        def change(info):
            if info is None or info.state is ActorState.DEAD:
                return _KEEP
            return dataclasses.replace(info, state=state, reason=reason,
                                       node_id=info.node_id if node_id is None else node_id)

        info = self._update_record(ACTORS, ActorInfo, actor_id, change)
        if info is not None and info.state is ActorState.DEAD and info.name is not None:
            self.store.compare_and_set(NAMED_ACTORS, named_actor_key(info.namespace, info.name),
                                       actor_id, None)
        return info

    def note_job_actor(self, job_id: str, actor_id: bytes, detached: bool) -> None:
        """Remember that job `job_id` made this actor, for `end_job_actors`."""
        self.store.put(JOB_ACTORS, f"{job_id}:{actor_id.hex()}", b"d" if detached else b"")

    def end_job_actors(self, job_id: str) -> None:
        """(A driver, at shutdown, where the actor records outlive the job, e.g.
        in an engine's scheduler.) Record every actor the job made (nested ones
        included) as dead, detached ones excepted, so that their names are free
        again; forget the job's list."""
        prefix = job_id + ":"
        for key in self.store.keys(JOB_ACTORS):
            key = key.decode()
            if not key.startswith(prefix):
                continue
            if self.store.get(JOB_ACTORS, key) != b"d":
                self.set_actor_state(bytes.fromhex(key[len(prefix):]), ActorState.DEAD,
                                     "its job ended")
            self.store.delete(JOB_ACTORS, key)

    def named_actor(self, name: str, namespace: str) -> ActorInfo | None:
        """The live (not DEAD) actor called `name` in `namespace`, or None."""
        actor_id = self.store.get(NAMED_ACTORS, named_actor_key(namespace, name))
        info = self.actor(actor_id) if actor_id is not None else None
        return None if info is None or info.state is ActorState.DEAD else info

    def named_actors(self) -> list[ActorInfo]:
        """The records of every live named actor, in every namespace."""
        out = []
        for key in self.store.keys(NAMED_ACTORS):
            actor_id = self.store.get(NAMED_ACTORS, key)
            info = self.actor(actor_id) if actor_id is not None else None
            if info is not None and info.state is not ActorState.DEAD:
                out.append(info)
        return out

    # -- nodes -------------------------------------------------------------------
    def register_node(self, node_id: str, address: str, resources: dict,
                      now: float | None = None) -> NodeInfo:
        """Record a node as ALIVE (again, if it registered before). A node
        recorded DEAD cannot come back under its id: BackendError."""
        beat = time.time() if now is None else now

        def change(node):
            if node is not None and node.state is NodeState.DEAD:
                raise exc.BackendError(f"node {node_id} was declared dead; a node that "
                                       f"comes back must register under a new id")
            return NodeInfo(node_id, address, dict(resources), NodeState.ALIVE, beat)

        return self._update_record(NODES, NodeInfo, node_id, change)

    def heartbeat(self, node_id: str, now: float | None = None) -> NodeInfo | None:
        """Record that the node is alive now. Returns its record (None if it is
        unknown); a DEAD node's record is left as it is, and the node should stop."""
        beat = time.time() if now is None else now

        def change(node):
            if node is None or node.state is NodeState.DEAD:
                return _KEEP
            return dataclasses.replace(node, heartbeat=max(beat, node.heartbeat))

        return self._update_record(NODES, NodeInfo, node_id, change)

    def mark_node_dead(self, node_id: str) -> NodeInfo | None:
        """Record the node as DEAD for good. Returns its record (None if unknown)."""

        def change(node):
            if node is None or node.state is NodeState.DEAD:
                return _KEEP
            return dataclasses.replace(node, state=NodeState.DEAD)

        return self._update_record(NODES, NodeInfo, node_id, change)

    def node(self, node_id: str) -> NodeInfo | None:
        return _decode_record(NodeInfo, self.store.get(NODES, node_id), NODES, node_id)

    def nodes(self) -> list[NodeInfo]:
        """Every node ever registered (dead ones too), in no particular order."""
        out = []
        for key in self.store.keys(NODES):
            node = _decode_record(NodeInfo, self.store.get(NODES, key), NODES, key)
            if node is not None:
                out.append(node)
        return out

    # -- object locations --------------------------------------------------------
    def _locations(self, raw: bytes | None, object_id: bytes) -> frozenset:
        if raw is None:
            return frozenset()
        values = _decode(raw, OBJECT_LOCATIONS, object_id)
        if len(values) != 1 or type(values[0]) is not tuple:
            raise exc.BackendError(f"control store: {OBJECT_LOCATIONS}[{_show(object_id)}] "
                                   f"is not a list of node ids")
        return frozenset(values[0])

    def object_locations(self, object_id: bytes) -> frozenset[str]:
        """The ids of the nodes that hold a copy of the object."""
        return self._locations(self.store.get(OBJECT_LOCATIONS, object_id), object_id)

    def add_object_location(self, object_id: bytes, node_id: str) -> None:
        """Record that `node_id` holds a copy of the object."""

        def change(raw):
            nodes = self._locations(raw, object_id)
            return _KEEP if node_id in nodes else _encode((tuple(sorted(nodes | {node_id})),))

        self._update(OBJECT_LOCATIONS, object_id, change)

    def remove_object_location(self, object_id: bytes, node_id: str) -> None:
        """Record that `node_id` no longer holds a copy; the last one removes the entry."""

        def change(raw):
            nodes = self._locations(raw, object_id)
            if node_id not in nodes:
                return _KEEP
            rest = nodes - {node_id}
            return _encode((tuple(sorted(rest)),)) if rest else None

        self._update(OBJECT_LOCATIONS, object_id, change)

    def remove_node_locations(self, node_id: str) -> None:
        """Record that `node_id` (dead) holds no copy of anything (a scan of the
        table: for a node's death, not for the hot path)."""
        for object_id in self.store.keys(OBJECT_LOCATIONS):
            self.remove_object_location(object_id, node_id)

    def forget_object(self, object_id: bytes) -> None:
        """Remove the object's entry (it was freed everywhere)."""
        self.store.delete(OBJECT_LOCATIONS, object_id)

    # -- placement groups ----------------------------------------------------------
    def create_placement_group(self, info: PlacementGroupInfo) -> None:
        """Record a new placement group; ValueError if a live one has its name."""
        if info.name:
            if not self.store.put(NAMED_PLACEMENT_GROUPS, info.name, info.pg_id,
                                  overwrite=False):
                held = self.store.get(NAMED_PLACEMENT_GROUPS, info.name)
                other = self.placement_group(held) if held is not None else None
                if other is not None and other.state != "REMOVED":
                    raise ValueError(f"a placement group named {info.name!r} already exists")
                if not self.store.compare_and_set(NAMED_PLACEMENT_GROUPS, info.name, held,
                                                  info.pg_id):
                    raise ValueError(f"a placement group named {info.name!r} already exists")
        self.store.put(PLACEMENT_GROUPS, info.pg_id, _encode_record(info))

    def placement_group(self, pg_id: bytes) -> PlacementGroupInfo | None:
        return _decode_record(PlacementGroupInfo, self.store.get(PLACEMENT_GROUPS, pg_id),
                              PLACEMENT_GROUPS, pg_id)

    def set_placement_group_state(self, pg_id: bytes, state: str) -> None:
        """Move the group to `state`; REMOVED is final and frees its name."""
        def change(info):
            if info is None or info.state == "REMOVED":
                return _KEEP
            return dataclasses.replace(info, state=state)

        info = self._update_record(PLACEMENT_GROUPS, PlacementGroupInfo, pg_id, change)
        if info is not None and info.state == "REMOVED" and info.name:
            self.store.compare_and_set(NAMED_PLACEMENT_GROUPS, info.name, pg_id, None)

    def named_placement_group(self, name: str) -> PlacementGroupInfo | None:
        """The placement group called `name` that is not removed, or None."""
        pg_id = self.store.get(NAMED_PLACEMENT_GROUPS, name)
        info = self.placement_group(pg_id) if pg_id is not None else None
        return None if info is None or info.state == "REMOVED" else info

    def placement_groups(self) -> list[PlacementGroupInfo]:
        out = []
        for key in self.store.keys(PLACEMENT_GROUPS):
            info = self.placement_group(key)
            if info is not None:
                out.append(info)
        return out
