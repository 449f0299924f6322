"""Identifiers for objects, tasks, actors and functions.

An id is 16 bytes: an 8-byte prefix random per process and an 8-byte counter,
so any process (driver, worker, another node) mints ids without coordination
and without a syscall per id. Ids are plain ``bytes``: hashable, cheap to pickle
and to send, and `.hex()` names shared-memory segments.
"""
from __future__ import annotations

import hashlib
import itertools
import os

ID_SIZE = 16

_prefix = os.urandom(8)
_counter = itertools.count(1)


def _reset_after_fork() -> None:
    global _prefix, _counter
    _prefix = os.urandom(8)
    _counter = itertools.count(1)
    

os.register_at_fork(after_in_child=_reset_after_fork)


def new_id() -> bytes:
    """A fresh process-unique, globally-unique-with-high-probability id."""
    # next() on itertools.count is atomic under the GIL: no lock needed.
    return _prefix + next(_counter).to_bytes(8, "little")


def minted_here(id_: bytes) -> bool:
    """Whether `new_id` made `id_` in this process (since its last fork)."""
    return id_[:8] == _prefix


def function_id(blob: bytes) -> bytes:
    """The id of a pickled function or class: a digest of its bytes, so the same
    code always gets the same id and is shipped to each worker only once."""
    return hashlib.blake2b(blob, digest_size=ID_SIZE).digest()


def short(id_: bytes) -> str:
    """A short printable form of an id, for reprs and log lines."""
    return id_.hex()[-12:]
