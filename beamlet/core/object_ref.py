"""ObjectRef: a future for a value in the object store."""
from __future__ import annotations

from . import runtime as _runtime
from .ids import ID_SIZE, short
from .serialization import note_contained_ref


NIL_ID = bytes(ID_SIZE)


class ObjectRef:
    """A reference to an object that exists, or will once its task finishes.

    Hashable and comparable by id. While any ObjectRef (in any process, or
    inside any stored value) refers to an object, the object is kept. Pickling
    a ref (into a task argument or a stored value) sends only its id.
    `await ref` and `ref.future()` wait without blocking a thread per ref.
    """

    __slots__ = ("id", "_runtime", "__weakref__")

    def __init__(self, object_id: bytes, _add_reference: bool = True):
        self.id = object_id
        rt = _runtime._current  # (current_or_none(), without the call: a hot path)
        self._runtime = rt
        if rt is not None and _add_reference:
            rt.refs.incr(object_id)

    def __del__(self):
        rt = self._runtime
        if rt is not None and not rt.refs.closed:
            try:
                rt.refs.drop(self.id)  # (decr, or handed over for later: see refcount.py)
            except Exception:  # interpreter shutdown: nothing left to free
                pass

    def __reduce__(self):
        rt = self._runtime
        if rt is not None and rt is not _runtime.current_or_none():
            from ..exceptions import ObjectLostError
            raise ObjectLostError(f"{self!r} belongs to a beamlet session that was shut "
                                  f"down; its object is gone")
        note_contained_ref(self.id)
        return (ObjectRef, (self.id,))

    def __hash__(self) -> int:
        return hash(self.id)

    def __eq__(self, other) -> bool:
        return isinstance(other, ObjectRef) and other.id == self.id

    def __repr__(self) -> str:
        return f"ObjectRef({self.id.hex()})"

    @classmethod
    def nil(cls) -> "ObjectRef":
        """The nil ref (all-zero id; Ray's ``ObjectRef.nil()``): refers to no
        object and holds no reference."""
        ref = cls.__new__(cls)
        ref.id = NIL_ID
        ref._runtime = None
        return ref

    def is_nil(self) -> bool:
        return self.id == NIL_ID

    def hex(self) -> str:
        return self.id.hex()

    def binary(self) -> bytes:
        return self.id

    def task_id(self) -> str:
        return short(self.id)

    def future(self):
        """A concurrent.futures.Future that completes with the value (or the error)."""
        import concurrent.futures  # here, not at import: `import beamlet` stays quick
        fut = concurrent.futures.Future()
        rt = _runtime.current()

        def complete() -> None:
            try:
                fut.set_result(rt.get_one(self, timeout=None))
            except BaseException as exc:  # noqa: BLE001 - the error is the result
                fut.set_exception(exc)

        # The value may be stored by the backend's I/O thread: the future's
        # callbacks (user code) run on the runtime's callback thread instead.
        rt.backend.object_store.on_ready(self.id, lambda _id: rt.call_soon(complete))
        return fut

    def as_future(self):
        """An asyncio.Future on the running event loop for the value (Ray's
        ``ObjectRef.as_future()``; the same as ``asyncio.wrap_future(ref.future())``)."""
        import asyncio
        return asyncio.wrap_future(self.future())

    def __await__(self):
        import asyncio
        return asyncio.wrap_future(self.future()).__await__()
