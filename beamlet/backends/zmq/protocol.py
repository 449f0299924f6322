"""The messages between a cluster's daemons (and the ``beamlet`` commands
that ask them), over the ZeroMQ transport: typed, versioned, one table.

Like the node's protocol (``backends/local/protocol.py``), each message is
a ``NamedTuple``, which travels as a plain tuple (`CODEC`); `VERSION` is
bound into every connection's handshake, so a daemon or command of another
version is refused at connect, naming both.

    member -> head   NodeJoin(node_id, address, resources)   once, first
    head -> member   JoinAccepted(control_store_url, heartbeat_s, dead_after_s)
    member -> head   Heartbeat(node_id, stats)                every heartbeat_s
    any -> head      StatusRequest()
    head -> any      StatusReply(nodes)
    head -> member   Refused(reason)                          then it closes
    any -> node      WorkersRequest()     (a connection of its own, as StatusRequest)
    node -> any      WorkersReply(workers)

A driver (``backend.py``) asks the head to join, then connects to every
node's own listener and runs its tasks there (``jobs.py`` is the node's
side). A small object travels as its `wire` form (its buffers out of band);
a large one stays in the store of the node that made it, which tells the
driver where it is (``Located``), and whoever needs it (another node, or the
driver's own get) pulls it from there in chunks (``objects.py``).

    driver -> head   DriverJoin()
    head -> driver   DriverAccepted(control_store_url, nodes)
    driver -> node   DriverHello(job_config)                  once, first
    driver -> node   RunTask(spec, objects, locations)
                       objects: values of its arguments the driver holds;
                       locations: [(id, node address)] of ones on other nodes
    node -> driver   Objects(objects)           each small result, once stored
    node -> driver   Located(objects)           large results kept on the node,
                                                and copies a node pulled
    node -> driver   Fetch(object_ids)          a worker or task needs these
    driver -> node   Objects(objects) / Locations(locations)   the answer
    node -> driver   NestedSubmit(spec, objects)   a worker's submission
    driver -> node   Release(object_ids)        actor tokens and objects kept for
                                                the driver that it let go of
    driver -> node   CancelTask(object_id, force, recursive) / KillActor(actor_id, no_restart)
    driver -> node   CreateGroup(info, hosted) / RemoveGroup(pg_id)   a placement
                                                group's bundles placed here (the node
                                                sends info.ready_id once reserved)
    node -> driver   CancelChildren(object_ids, force)   cancel these children of a
                                                cancelled task (not run on this node)
    node -> driver   Report(events, objects)    TaskFinished / TaskProgress / Lent events
                                                (what the node's scheduler told its
                                                observers, for the driver's hooks and
                                                task record), then results; queued and
                                                sent with the next results (or within
                                                the daemon's tick)
    node -> driver   ActorState(...)            (also for the driver's hooks)
    node -> driver   OwnerDied(object_ids, reason)   objects a dead worker put
    node -> driver   Borrow(added, released)    refs the node's workers hold
                                                (first one) or let go of (last)
    any -> node      Pull(object_ids)           send me these (a peer node or driver)
    node -> node     Claim(object_ids)          send me these once made here (results of a
                                                detached actor's nested tasks whose driver
                                                left, asked by the actor's node: see jobs.py)
    node -> puller   Chunk(...) per piece (sent with send_piece: its data sealed
                       apart, decrypted into place), or Missing(object_ids)
"""
from __future__ import annotations

from typing import NamedTuple

from ... import exceptions as exc
from ...core.serialization import SerializedObject, serialize
from ...core.task_spec import TaskSpec
from ..local.transport import ProtocolError

VERSION = "beamlet-cluster/10"  # 2: drivers run tasks on nodes; 3: nodes pull objects;
# 4: nodes report task ends and actor states, recursive cancel across nodes;
# 5: placement groups' bundles reserved on nodes, task progress reported (Report);
# 6: messages travel as plain tuples (CODEC)
# 7: nodes report CPUs lent by tasks blocked in get (Lent, in Report)
# 8: a Report's events travel as plain tuples too (CODEC)
# 9: direct driver -> actor-worker channels (DirectOpen, DirectLost; see direct.py)
# 10: a detached actor's node claims its nested results made elsewhere (Claim)

#: Seconds between a member's heartbeats (they carry its figures for ``beamlet
#: status``). The head declares a member dead at once when its connection drops,
#: or after `transport.dead_after()` seconds without a heartbeat (10 by default:
#: a starved but live member is not taken for dead); JoinAccepted tells both.
HEARTBEAT_INTERVAL = 0.5


class NodeJoin(NamedTuple):
    node_id: str
    address: str     # the member's own listening address (host:port)
    resources: dict  # what it can hand out: {"CPU": 2.0, "GPU": 0.0, ...}


class JoinAccepted(NamedTuple):
    control_store_url: str  # the cluster's Redis (with its password)
    heartbeat_s: float
    dead_after_s: float


class Heartbeat(NamedTuple):
    node_id: str
    stats: dict  # resources available, object-store use, queued tasks, actors


class Refused(NamedTuple):
    reason: str


class StatusRequest(NamedTuple):
    pass


class StatusReply(NamedTuple):
    nodes: list  # one dict per node: see HeadDaemon.status()


class WorkersRequest(NamedTuple):
    pass


class WorkersReply(NamedTuple):
    workers: list  # one dict per worker process of the node (Backend.workers' rows)


class DriverJoin(NamedTuple):
    pass


class DriverAccepted(NamedTuple):
    control_store_url: str
    nodes: list  # as in StatusReply


class DriverHello(NamedTuple):
    job_config: dict  # job id, namespace, sys_path, cwd, runtime_env, metadata, actor lifetime


class RunTask(NamedTuple):
    spec: object      # a TaskSpec
    objects: list     # [(object_id, wire form)]: values of its arguments
    locations: list   # [(object_id, address)]: arguments to pull from other nodes


class Objects(NamedTuple):
    objects: list     # [(object_id, wire form)]


class Located(NamedTuple):
    objects: list     # [(object_id, size, is_error, refs)]: held by the sender for the driver
    pulled: bool      # copies it pulled (else: objects made there)


class Locations(NamedTuple):
    locations: list   # [(object_id, address)]: pull these from there


class Pull(NamedTuple):
    object_ids: list


class Claim(NamedTuple):
    """Send these as Pull does, each once it is made here (Missing for those
    neither held nor being made here)."""
    object_ids: list


class Chunk(NamedTuple):
    """A piece of an object's shared-memory layout (``shm.py``): `total` bytes
    in all, `data` at `offset`."""
    object_id: bytes
    offset: int
    total: int
    is_error: bool
    refs: tuple
    data: memoryview


class Missing(NamedTuple):
    object_ids: list  # asked for with Pull (or Claim), not held (or being made) here


class Fetch(NamedTuple):
    object_ids: list


class NestedSubmit(NamedTuple):
    spec: object
    objects: list     # the values of its arguments that the node holds


class Release(NamedTuple):
    object_ids: list


class CancelTask(NamedTuple):
    object_id: bytes
    force: bool
    recursive: bool


class CancelChildren(NamedTuple):
    object_ids: list  # the first return ids of the children to cancel, recursively
    force: bool


class Borrow(NamedTuple):
    """The node's workers now hold refs to `added`, and none any more to
    `released`: the driver counts the node as one holder of each."""
    added: list
    released: list


class OwnerDied(NamedTuple):
    """Objects a worker put on the node died with it (OwnerDiedError)."""
    object_ids: list
    reason: str


class TaskFinished(NamedTuple):
    """An attempt of the driver's task ended on the node (the
    ``beamlet_task_finished`` hook's arguments; sent before its results)."""
    task_id: bytes
    attempt: int
    status: str
    duration: float
    pid: int | None


class TaskProgress(NamedTuple):
    """The driver's task moved on the node (the scheduler's ``task_progress``:
    waiting for arguments or resources, sent to its worker, running)."""
    task_id: bytes
    attempt: int
    state: str
    pid: int | None
    when: float  # time.time() on the node


class Lent(NamedTuple):
    """The CPUs of the driver's task (or actor: its creation's task id) on the
    node are lent out while its worker waits in get or wait (`lent`), or were
    taken back: the driver counts them free meanwhile (spillback)."""
    task_id: bytes
    lent: bool


class Report(NamedTuple):
    """What the node's scheduler told of the driver's tasks (``TaskFinished``,
    ``TaskProgress`` and ``Lent``, in order), then results (as ``Objects``):
    one message where there would be several."""
    events: list
    objects: list     # [(object_id, wire form)]


class ActorState(NamedTuple):
    """The driver's actor changed state on the node (``beamlet_actor_state``)."""
    actor_id: bytes
    class_name: str
    state: str
    reason: str


class KillActor(NamedTuple):
    actor_id: bytes
    no_restart: bool


class CreateGroup(NamedTuple):
    """Reserve the bundles `hosted` (indices) of placement group `info` (a
    ``tables.PlacementGroupInfo``) on this node; its ``ready_id`` is this
    node's own, stored (and sent to the driver as a result) once they are."""
    info: object
    hosted: list


class RemoveGroup(NamedTuple):
    """Give back placement group `pg_id`'s bundles here; end what runs in them."""
    pg_id: bytes


class DirectOpen(NamedTuple):
    """Ask the worker of actor `actor_id` (alive on this node) to open a direct
    channel to the driver's port at `address`, naming it by `token` (see
    ``direct.py``)."""
    actor_id: bytes
    address: str
    token: bytes


class DirectLost(NamedTuple):
    """The direct channel `token` closed with these calls (their specs' fields)
    unanswered: the node treats them as calls in flight on the actor's worker
    when it died (retried per ``max_task_retries``, else failed), in order,
    before the driver's later calls of that actor."""
    token: bytes
    specs: list


def wire(sobj) -> tuple:
    """A SerializedObject as a message carries it: its buffers as memoryviews,
    which the transport sends out of band without copying (a shared-memory
    object goes straight from its mapping to the socket)."""
    return (sobj.data, [memoryview(b) for b in sobj.buffers], tuple(sobj.refs), sobj.is_error)


def unwire(form):
    """The SerializedObject of a `wire` form (buffers: views of the frames, no copy)."""
    data, buffers, refs, is_error = form
    return SerializedObject(bytes(data), list(buffers), tuple(refs), bool(is_error))


def send_object(conn, object_id: bytes, sobj) -> None:
    """Send one object (``Objects``); one too large for a message goes as an
    error that says so, for whoever gets it. BackendError if the peer is gone."""
    try:
        conn.send(Objects([(object_id, wire(sobj))]))
    except ProtocolError as err:
        error = exc.ObjectStoreFullError(f"object {object_id.hex()} cannot be sent between "
                                         f"nodes: {err}")
        conn.send(Objects([(object_id, wire(serialize(error, is_error=True)))]))


#: What the head accepts on a connection, and what a member accepts from the head.
TO_HEAD = frozenset({NodeJoin, Heartbeat, StatusRequest, DriverJoin})
#: What a node (head or member) accepts from a driver.
FROM_DRIVER = frozenset({DriverHello, RunTask, Objects, Locations, Release, CancelTask,
                         KillActor, Pull, CreateGroup, RemoveGroup, DirectOpen, DirectLost,
                         Claim})
#: What a driver accepts from a node.
TO_DRIVER = frozenset({Objects, Located, Fetch, NestedSubmit, Chunk, Missing, CancelChildren,
                       TaskFinished, ActorState, OwnerDied, Borrow, Report})
#: What a node accepts from a node it pulls from.
TO_PULLER = frozenset({Chunk, Missing})
TO_MEMBER = frozenset({JoinAccepted, Refused})


#: Wire tags, by position. Append only (and change VERSION).
_CLASSES = (NodeJoin, JoinAccepted, Heartbeat, Refused, StatusRequest, StatusReply, DriverJoin,
            DriverAccepted, DriverHello, RunTask, Objects, Located, Locations, Pull, Chunk,
            Missing, Fetch, NestedSubmit, Release, CancelTask, CancelChildren, Borrow,
            OwnerDied, TaskFinished, ActorState, KillActor, WorkersRequest, WorkersReply,
            TaskProgress, Report, CreateGroup, RemoveGroup, Lent, DirectOpen, DirectLost,
            Claim)
_TAGS = {cls: tag for tag, cls in enumerate(_CLASSES)}
_RUN_TASK, _NESTED_SUBMIT, _REPORT = _TAGS[RunTask], _TAGS[NestedSubmit], _TAGS[Report]
#: What a Report's events may be: tag -> (class, length of its wire form).
_EVENTS = {_TAGS[cls]: (cls, len(cls._fields) + 1) for cls in (TaskFinished, TaskProgress, Lent)}
_NOT_AN_EVENT = (None, -1)
_ARITY = tuple(len(cls._fields) for cls in _CLASSES)
#: Makes a message from a tuple of all its fields, in C (where their count is known right).
_new_tuple = tuple.__new__


class Codec:
    """The messages' wire form (the transports' `codec`): a plain tuple, the
    class's tag and its fields, with a task's spec as the tuple of its fields
    too, and a Report's events as tuples of the same form. Unpickling a class
    costs an import lookup on each side (several us per class, two per
    RunTask, two per Report of a call's progress and end), a tuple none; as
    the node's protocol does (``local/protocol.py``). A message of a class
    not listed travels whole.
    `decode` raises ValueError or TypeError for a tuple that is not a message
    (the transport closes that connection)."""

    @staticmethod
    def encode(message):
        cls = type(message)
        if cls is RunTask:
            spec, objects, locations = message
            return (_RUN_TASK, spec.__reduce__()[1], objects, locations)
        if cls is NestedSubmit:
            return (_NESTED_SUBMIT, message.spec.__reduce__()[1], message.objects)
        if cls is Report:
            return (_REPORT, [(_TAGS[type(e)], *e) for e in message.events], message.objects)
        tag = _TAGS.get(cls)
        return message if tag is None else (tag, *message)

    @staticmethod
    def decode(frame):
        if type(frame) is not tuple:
            return frame  # (a message that travels whole)
        tag = frame[0] if frame else None
        if type(tag) is not int or not 0 <= tag < len(_CLASSES):
            raise ValueError(f"a tuple that is not a message ({len(frame)} fields)")
        if tag == _RUN_TASK and len(frame) == 4:
            _, spec, objects, locations = frame
            return _new_tuple(RunTask, (TaskSpec(*spec), objects, locations))
        if tag == _NESTED_SUBMIT and len(frame) == 3:
            return _new_tuple(NestedSubmit, (TaskSpec(*frame[1]), frame[2]))
        if tag == _REPORT and len(frame) == 3 and type(frame[1]) is list:
            events = []
            shape = _EVENTS.get
            for event in frame[1]:
                cls, size = shape(event[0], _NOT_AN_EVENT)
                if len(event) != size:
                    raise ValueError("a Report with an event that is not one")
                events.append(_new_tuple(cls, event[1:]))
            return _new_tuple(Report, (events, frame[2]))
        if len(frame) - 1 == _ARITY[tag]:
            return _new_tuple(_CLASSES[tag], frame[1:])
        return _CLASSES[tag](*frame[1:])  # (TypeError, naming the count, unless defaults fill it)


CODEC = Codec()


def describe(message) -> str:
    """A short description of a received value, for errors (never its repr in full)."""
    return f"{type(message).__name__} ({len(repr(message))} chars)"
