"""Messages between the local backend's driver and its workers.

Every message is a tuple whose first item is one of the tags below. Objects
travel as *entries*: a ``SerializedObject`` (small values, inline) or a
``ShmEntry`` (a value in a shared-memory segment, by name).

Worker -> driver
    (HELLO, worker_id, pid)
    (DONE, task_id, entries, retryable)        a task or call finished; entries per return id
    (SUBMIT, spec)                             a task submitted from inside a task
    (PUT, object_id, entry)                    put() inside a task
    (REQUEST, req_id, op, args)                needs a REPLY: get, wait, control, resources,
                                               alloc (segments to write results/puts into),
                                               abandon (granted segments that will not be used)
    (REFS, added_ids, released_ids)            borrow counts changed (sent before anything else)
    (CANCEL, object_id, force) / (KILL_ACTOR, actor_id, no_restart)
    (FORGET, req_id)                           a blocking get gave up (timeout): not waiting now

Driver -> worker
    (WELCOME, config)                          sys.path, cwd, session, node id
    (EXECUTE, spec, blobs, entries, gpu_ids)   run it; blobs: code not sent before; entries: args in shm
    (REPLY, req_id, ok, payload)               payload is the answer, or the exception to raise
    (CANCEL, task_id, force)                   interrupt the task if it is running
    (EXIT,)                                    finish now
"""
from __future__ import annotations

import reprlib

#: The protocol a connection speaks, bound into its handshake (core/auth.py): a
#: process of another version is refused, both versions named. Change it with
#: any change to the messages below.
VERSION = "beamlet-local/1"

HELLO = 1
DONE = 2
SUBMIT = 3
PUT = 4
REQUEST = 5
REFS = 6
CANCEL = 7
KILL_ACTOR = 8
FORGET = 9
WELCOME = 10
EXECUTE = 11
REPLY = 12
EXIT = 13

#: Tag -> length of each message a worker may send, and the driver may send.
FROM_WORKER = {HELLO: 3, DONE: 4, SUBMIT: 2, PUT: 3, REQUEST: 4, REFS: 3, CANCEL: 3,
               KILL_ACTOR: 3, FORGET: 2}
FROM_DRIVER = {WELCOME: 2, EXECUTE: 5, REPLY: 4, CANCEL: 3, EXIT: 1}


def well_formed(message, allowed: dict) -> bool:
    """Whether `message` is a tuple of one of the `allowed` tags, of its length.
    A peer that sends anything else is broken (or hostile): close its connection."""
    return (type(message) is tuple and len(message) > 0 and type(message[0]) is int
            and allowed.get(message[0]) == len(message))


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
