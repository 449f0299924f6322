"""Turning values into bytes and back.

`serialize` uses cloudpickle (so lambdas, closures and classes defined in
``__main__`` travel) with pickle protocol 5: large contiguous buffers, numpy
arrays above all, are kept out of band in ``SerializedObject.buffers`` instead
of being copied into the pickle stream. An object store can lay them out in
shared memory and `deserialize` rebuilds arrays as views of that memory, with
no copy. Small numpy arrays are the exception: while the value's arrays
pickled so far total at most ``SMALL_ARRAY_BYTES``, each C- or F-contiguous
one (plain ``ndarray``, no Python objects in it) goes into the stream as
bytes and comes back as a read-only array over them, as an out-of-band one
would. An out-of-band buffer costs each message that carries it more than
copying a few KiB does.

ObjectRefs and ActorHandles inside a value pickle as their ids; the ids of the
refs met while pickling are collected in ``SerializedObject.refs`` so that the
owner can keep those objects alive while the value that contains them lives.

Plugins can teach the serializer extra types (the `beamlet_serializers` hook);
`register_serializer` is the same thing for code that is not a plugin.
"""
from __future__ import annotations

import collections
import io
import pickle
import sys
import threading
import types
from typing import Any, Callable

import cloudpickle

from ..exceptions import BeamletError as _BeamletError

# Types pickled by the fast path: plain pickle is much quicker than cloudpickle
# for them and there is nothing cloudpickle would do differently.
_PLAIN_TYPES = frozenset({type(None), bool, int, float, complex, str, bytes})
#: (The same, for callers that pickle such a value themselves: ``pickle.dumps(v, 5)``
#: is then its whole serialized form, without buffers or refs.)
PLAIN_TYPES = _PLAIN_TYPES

#: While a value's arrays pickled so far total at most this many bytes, each
#: contiguous one is pickled in the stream (see the module's docstring).
SMALL_ARRAY_BYTES = 64 * 1024

_extra_reducers: dict[type, Callable[[Any], tuple]] = {}
# Filled with numpy.ndarray's reducer once numpy has been imported (beamlet
# does not import it; no array can exist before it is).
_array_reducers: dict[type, Callable[[Any], tuple]] = {}
_local = threading.local()


class SerializedObject:
    """A serialized value: the pickle stream, its out-of-band buffers, and the
    ids of the ObjectRefs it contains. ``is_error`` marks a stored exception
    that `get` must raise instead of return."""

    __slots__ = ("data", "buffers", "refs", "is_error")

    def __init__(self, data: bytes, buffers: list | tuple = (), refs: tuple = (),
                 is_error: bool = False):
        self.data = data
        self.buffers = buffers
        self.refs = refs
        self.is_error = is_error

    @property
    def total_bytes(self) -> int:
        """Size of the stream plus all buffers, in bytes."""
        if not self.buffers:
            return len(self.data)
        return len(self.data) + sum(memoryview(b).nbytes for b in self.buffers)

    def detached(self) -> "SerializedObject":
        """This object with its buffers copied: serialize() leaves them as views of
        the caller's arrays, so a value kept past the call must not share them
        (changing the array afterwards must not change the stored object)."""
        if all(isinstance(b, bytes) for b in self.buffers):
            return self  # nothing to copy: no buffers, or already copied
        return SerializedObject(self.data, [b if isinstance(b, bytes) else
                                            bytes(memoryview(b).cast("B")) for b in self.buffers],
                                self.refs, self.is_error)

    def __reduce__(self):
        # Sent inline (small values): buffers travel as bytes inside the message.
        copy = self.detached() if self.buffers else self
        return (SerializedObject, (copy.data, copy.buffers, copy.refs, copy.is_error))

    def __repr__(self) -> str:
        return (f"SerializedObject({self.total_bytes} bytes, {len(self.buffers)} buffers, "
                f"{len(self.refs)} refs{', error' if self.is_error else ''})")


_CLOUDPICKLE_CODE_REDUCE = cloudpickle.Pickler.dispatch_table[types.CodeType]


def _reduce_code(code: types.CodeType) -> tuple:
    """cloudpickle's reduction of a code object, but keeping its file name
    (cloudpickle puts ``<dynamic-code>`` there), so that tracebacks of code
    pickled by value name the real file and line, as Ray's do."""
    rebuild, args = _CLOUDPICKLE_CODE_REDUCE(code)
    return rebuild, tuple(code.co_filename if type(a) is str and a == "<dynamic-code>" else a
                          for a in args)


def _small_array(data: bytes, dtype, shape: tuple, order: str):
    """The array `_reduce_array` pickled: read-only, over `data` (no copy)."""
    import numpy
    return numpy.frombuffer(data, dtype).reshape(shape, order=order)


def _reduce_array(arr) -> tuple:
    """A numpy array in the stream when it is small (see the module's
    docstring), else numpy's own reduction (large contiguous arrays out of band)."""
    left = getattr(_local, "small_left", 0)
    nbytes = arr.nbytes
    if nbytes <= left and not arr.dtype.hasobject and arr.dtype.itemsize:
        flags = arr.flags
        order = "C" if flags.c_contiguous else "F" if flags.f_contiguous else None
        if order is not None:
            _local.small_left = left - nbytes
            dtype = arr.dtype
            if dtype.fields is None and dtype.subdtype is None and dtype.metadata is None:
                dtype = dtype.str   # (a dtype object pickles as a class and a state)
            return _small_array, (arr.tobytes(order), dtype, arr.shape, order)
    return arr.__reduce_ex__(5)


def _note_numpy() -> None:
    numpy = sys.modules.get("numpy")
    if numpy is not None and hasattr(numpy, "ndarray"):   # (not while it is half imported)
        _array_reducers[numpy.ndarray] = _reduce_array


class _Pickler(cloudpickle.Pickler):
    dispatch_table = collections.ChainMap(_array_reducers, _extra_reducers,
                                          {types.CodeType: _reduce_code},
                                          cloudpickle.Pickler.dispatch_table)


def register_serializer(cls: type, reducer: Callable[[Any], tuple]) -> None:
    """Pickle instances of `cls` with `reducer` (a ``copyreg``-style function
    returning ``(callable, args)``), in this process."""
    if not isinstance(cls, type):
        raise TypeError(f"register_serializer needs a class, got {cls!r}")
    _extra_reducers[cls] = reducer


def note_contained_ref(object_id: bytes) -> None:
    """Called by ObjectRef.__reduce__: records the id while a value is pickled."""
    refs = getattr(_local, "refs", None)
    if refs is not None:
        refs.append(object_id)


def serialize(value: Any, is_error: bool = False) -> SerializedObject:
    """Serialize `value`. Raises TypeError naming the type when it cannot be pickled."""
    if type(value) in _PLAIN_TYPES:
        return SerializedObject(pickle.dumps(value, 5), (), (), is_error)
    if not _array_reducers:
        _note_numpy()
    buffers: list[pickle.PickleBuffer] = []
    outer = getattr(_local, "refs", None)
    outer_left = getattr(_local, "small_left", 0)
    _local.refs = refs = []
    _local.small_left = SMALL_ARRAY_BYTES
    try:
        stream = io.BytesIO()
        _Pickler(stream, protocol=5, buffer_callback=buffers.append).dump(value)
    except _BeamletError:
        raise  # e.g. a ref of a session that was shut down: say so, not "cannot serialize"
    except Exception as exc:
        raise TypeError(f"cannot serialize {_describe(value)}: {type(exc).__name__}: {exc}") from exc
    finally:
        _local.refs = outer
        _local.small_left = outer_left
    if outer is not None:
        outer.extend(refs)
    raw = [b.raw() for b in buffers]
    return SerializedObject(stream.getvalue(), raw, tuple(dict.fromkeys(refs)), is_error)


def deserialize(sobj: SerializedObject) -> Any:
    """The value `sobj` holds. Out-of-band buffers are used in place, not copied."""
    return pickle.loads(sobj.data, buffers=sobj.buffers)


def dumps(value: Any) -> bytes:
    """Serialize `value` to one bytes object (buffers in band), for control
    messages and metadata rather than for data."""
    try:
        stream = io.BytesIO()
        _Pickler(stream, protocol=5).dump(value)
        return stream.getvalue()
    except Exception as exc:
        raise TypeError(f"cannot serialize {_describe(value)}: {type(exc).__name__}: {exc}") from exc


loads = pickle.loads


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"a value of type {type(value).__qualname__} ({text})"
