"""The messages between a node and its workers: typed, versioned, one table.

Each message is a small ``NamedTuple`` class, so the receiver gets a value of
a known type with named fields, and dispatches on ``type(message)`` through
one table (the node's in node.py, the worker's in worker.py). On the wire
(`CODEC`) a message is a plain tuple, its class's tag and its fields, with a
task's spec and inline results as plain tuples too: unpickling a class costs
an import lookup (about 2 us each), several per message otherwise. A frame
holding anything but a message its receiver accepts (`FROM_WORKER`,
`FROM_NODE`), or a message with the wrong number of fields, is a protocol
error: the connection is closed. `VERSION` is bound into every connection's
handshake (core/auth.py), so a process of another version is refused before
it sends anything.

Objects travel as *entries*: a ``SerializedObject`` (small values, inline) or
a ``ShmEntry`` (a value in a shared-memory segment, by name).

Requests (the ``*Request`` messages) carry a ``req_id`` and are answered by
one ``Reply`` with that id; a worker that stops waiting for one (a timeout)
sends ``Forget``.
"""
from __future__ import annotations

import reprlib
from typing import Any, NamedTuple

from ...core.serialization import SerializedObject
from ...core.task_spec import TaskSpec

#: The protocol a connection speaks, bound into its handshake (core/auth.py): a
#: process of another version is refused, both versions named. Change it with
#: any change to the messages below.
VERSION = "beamlet-local/7"


# -- worker -> node ----------------------------------------------------------------
class Hello(NamedTuple):
    """The first message of a worker's connection."""
    worker_id: str
    pid: int


class Done(NamedTuple):
    """A task or actor call finished: one entry per return id."""
    task_id: bytes
    entries: list
    retryable: bool  # it failed and asks for another attempt (retry_exceptions)


class Submit(NamedTuple):
    """A task submitted from inside a task."""
    spec: Any


class Put(NamedTuple):
    """``put()`` inside a task (a large entry's segment was allocated first)."""
    object_id: bytes
    entry: Any


class StreamItem(NamedTuple):
    """An item a generator task yielded (core/generators.py): stored like a
    Put, but owned by the job, not by this worker (it outlives the producer)."""
    object_id: bytes
    entry: Any


class Refs(NamedTuple):
    """Borrowed references taken and let go since the last message (sent before
    any other message, so that no object is freed under a borrower)."""
    added: list
    released: list


class CancelTask(NamedTuple):
    """``cancel()`` inside a task: cancel the task that makes `object_id`."""
    object_id: bytes
    force: bool
    recursive: bool = True


class KillActor(NamedTuple):
    """``kill()`` inside a task; `exited`: the actor itself called exit_actor()
    and its process is ending by itself (Scheduler.actor_exited)."""
    actor_id: bytes
    no_restart: bool
    exited: bool = False


class Forget(NamedTuple):
    """The worker stopped waiting for request `req_id` (it timed out)."""
    req_id: int


class Returned(NamedTuple):
    """Tasks sent ahead (see the scheduler's pipelining) that the worker gives
    back unstarted: its running task waits in get or wait, or the node asked
    (REVOKE), so they must run elsewhere."""
    task_ids: list


class GetRequest(NamedTuple):
    """Reply with the entries of `ids` once all exist. `blocking`: the worker's
    thread waits meanwhile, so its CPUs are lent out. `fail_fast`: reply as soon
    as one of them exists as an error, with None for those still missing."""
    req_id: int
    ids: list
    blocking: bool
    fail_fast: bool = False


class WaitRequest(NamedTuple):
    """Reply with a set of present ids once `num_returns` of `ids` exist (0: at once)."""
    req_id: int
    ids: list
    num_returns: int
    blocking: bool


class AllocRequest(NamedTuple):
    """Reply with the names of new segments of these sizes (all or none)."""
    req_id: int
    sizes: list


class AbandonRequest(NamedTuple):
    """Granted segments that will not be written after all."""
    req_id: int
    names: list


class ControlRequest(NamedTuple):
    """A control-store call (`op` is one of its methods)."""
    req_id: int
    op: str
    args: tuple


class ResourcesRequest(NamedTuple):
    """The node's ``"total"`` or ``"available"`` resources."""
    req_id: int
    which: str


class DirectDone(NamedTuple):
    """(A cluster node's actor worker.) A call that came over a direct channel
    (`token`, see ``zmq/direct.py``) finished with results that go through the
    node's store (large, or holding refs): the node hands them to the
    channel's driver as it does its own calls' results, if `tag` (the
    driver's, sent with the call: ``direct.call_tag``) shows the driver sent
    that call on that channel."""
    token: bytes
    spec: Any
    entries: list
    retryable: bool
    tag: bytes


# -- node -> worker ----------------------------------------------------------------
class Welcome(NamedTuple):
    """The answer to Hello: session, node id, sys.path, cwd, resources."""
    config: dict


class Execute(NamedTuple):
    """Run a task or call. `blobs`: code the worker was not sent before;
    `entries`: its arguments in shared memory; `gpu_ids`: its GPUs (None: none asked);
    `ahead`: sent ahead, to run after the task the worker runs now (see Returned)."""
    spec: Any
    blobs: list
    entries: Any
    gpu_ids: Any
    ahead: bool = False


class Reply(NamedTuple):
    """The answer to request `req_id`: the payload, or (ok False) the exception to raise."""
    req_id: int
    ok: bool
    payload: Any


class Interrupt(NamedTuple):
    """Cancel task `task_id`: interrupt it if it is running (`force`: exit the
    process, if that task is the one running), else fail it when it starts.
    `recursive` (an actor call's cancel): cancel the tasks the call submitted
    too, which the worker, not the node, knows (``Worker.cancel_children``)."""
    task_id: bytes
    force: bool
    recursive: bool


class Exit(NamedTuple):
    """Finish now."""


class Revoke(NamedTuple):
    """Give task `task_id`, sent ahead, back (RETURNED) unless it started: a
    worker is idle that can run it now."""
    task_id: bytes


class DirectConnect(NamedTuple):
    """(A cluster node, to an actor's worker.) Open direct channel `token` to
    the driver listening at `address`, proving `key` (see ``zmq/direct.py``)."""
    token: bytes
    address: str
    key: bytes


#: What each side accepts.
FROM_WORKER = frozenset({Hello, Done, Submit, Put, Refs, CancelTask, KillActor, Forget,
                         GetRequest, WaitRequest, AllocRequest, AbandonRequest, ControlRequest,
                         ResourcesRequest, Returned, StreamItem, DirectDone})
FROM_NODE = frozenset({Welcome, Execute, Reply, Interrupt, Exit, Revoke, DirectConnect})


def _reduce_message(message):
    # (class, fields): rebuilt by calling the class, which checks the number of
    # fields. (A NamedTuple's default reduce goes through copyreg and
    # __getnewargs__: twice as slow.) Used when a message is pickled whole,
    # by a connection without the codec.
    return (type(message), tuple(message))


for _message_class in FROM_WORKER | FROM_NODE:
    _message_class.__reduce__ = _reduce_message

#: Wire tags, by position. Append only (and change VERSION).
_CLASSES = (Hello, Done, Submit, Put, Refs, CancelTask, KillActor, Forget, GetRequest,
            WaitRequest, AllocRequest, AbandonRequest, ControlRequest, ResourcesRequest,
            Welcome, Execute, Reply, Interrupt, Exit, Returned, Revoke, StreamItem, DirectDone,
            DirectConnect)
_TAGS = {cls: tag for tag, cls in enumerate(_CLASSES)}
_EXECUTE, _DONE, _STREAM_ITEM = _TAGS[Execute], _TAGS[Done], _TAGS[StreamItem]


#: Makes a message from a tuple of all its fields, in C (a NamedTuple's own
#: __new__ is a Python function); only where the count of fields is known right.
_new_tuple = tuple.__new__


def _entry_out(entry):
    if type(entry) is SerializedObject:
        if entry.buffers:
            entry = entry.detached()
        return (entry.data, entry.buffers, entry.refs, entry.is_error)
    return entry


def _entry_in(entry):
    return SerializedObject(*entry) if type(entry) is tuple else entry


def inline_done(task_id: bytes, value: SerializedObject, retryable: bool) -> tuple:
    """The wire form (`CODEC`'s encoding) of ``Done(task_id, [value], retryable)``
    for a value without buffers: what a worker sends after most calls, made
    without the encoder's dispatch (send it with ``send_encoded``)."""
    return (_DONE, task_id, [(value.data, (), value.refs, value.is_error)], retryable)


class Codec:
    """Turns messages into plain tuples for the transport's pickles and back
    (see the module's docstring). `decode` raises ValueError or TypeError for
    anything that is not a message (the transport closes the connection)."""

    @staticmethod
    def encode(message):
        cls = type(message)
        if cls is Execute:
            spec, blobs, entries, gpu_ids, ahead = message
            return (_EXECUTE, spec.fields(), blobs, entries, gpu_ids, ahead)
        if cls is Done:
            task_id, entries, retryable = message
            if len(entries) == 1:
                entry = entries[0]
                if type(entry) is SerializedObject and not entry.buffers:
                    # (_entry_out of the usual one entry, inline)
                    return (_DONE, task_id, [(entry.data, entry.buffers, entry.refs,
                                              entry.is_error)],
                            retryable)
            return (_DONE, task_id, [_entry_out(e) for e in entries], retryable)
        if cls is StreamItem:
            return (_STREAM_ITEM, message.object_id, _entry_out(message.entry))
        tag = _TAGS.get(cls)
        return message if tag is None else (tag, *message)

    @staticmethod
    def decode(frame):
        if type(frame) is not tuple:
            if type(frame) in _TAGS:
                return frame  # a message pickled whole (a peer without the codec)
            raise ValueError(f"a message that is not one of the protocol's: {describe(frame)}")
        tag = frame[0] if frame else None
        if type(tag) is not int:
            raise ValueError(f"a message that is not one of the protocol's: {describe(frame)}")
        if tag == _EXECUTE:  # (the two usual messages first)
            _, spec, blobs, entries, gpu_ids, ahead = frame
            return _new_tuple(Execute, (TaskSpec(*spec), blobs, entries, gpu_ids, ahead))
        if tag == _DONE:
            _, task_id, entries, retryable = frame
            if type(entries) is list and len(entries) == 1:
                entry = entries[0]
                return _new_tuple(Done, (task_id, [SerializedObject(*entry) if type(entry) is tuple
                                                   else entry], retryable))
            return Done(task_id, [_entry_in(e) for e in entries], retryable)
        if not 0 <= tag < len(_CLASSES):
            raise ValueError(f"a message that is not one of the protocol's: {describe(frame)}")
        if tag == _STREAM_ITEM:
            _, object_id, entry = frame
            return StreamItem(object_id, _entry_in(entry))
        return _CLASSES[tag](*frame[1:])


CODEC = Codec()

#: Request messages by the short names the worker's client side uses.
REQUESTS = {"get": GetRequest, "wait": WaitRequest, "alloc": AllocRequest,
            "abandon": AbandonRequest, "control": ControlRequest,
            "resources": ResourcesRequest}


def describe(message) -> str:
    """A short description of a (possibly malformed) message, for logs."""
    try:
        return reprlib.repr(message)
    except Exception:  # noqa: BLE001 - describing garbage must not fail
        return f"a {type(message).__name__}"


class ShmEntry:
    """An object stored in the shared-memory segment `name` (`size` bytes).

    ``spilled`` is the path of its copy on disk once it was spilled out of
    shared memory (then the segment is gone until it is restored)."""

    __slots__ = ("name", "size", "is_error", "refs", "spilled")

    def __init__(self, name: str, size: int, is_error: bool = False, refs: tuple = (),
                 spilled: str | None = None):
        self.name = name
        self.size = size
        self.is_error = is_error
        self.refs = refs
        self.spilled = spilled

    @property
    def total_bytes(self) -> int:
        return self.size

    def __reduce__(self):
        return (ShmEntry, (self.name, self.size, self.is_error, self.refs, None))

    def __repr__(self) -> str:
        return f"ShmEntry({self.name}, {self.size} bytes)"
