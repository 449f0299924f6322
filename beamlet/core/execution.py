"""Running a TaskSpec in this process: the part every backend shares.

The Executor loads functions and classes by id (once, then cached), resolves
top-level ref arguments through the object store, runs the task or actor
method with the task context set, and turns the outcome into one
SerializedObject per return id: the values, or the same error for all of
them. It decides nothing about scheduling; the caller stores the results.
"""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import threading
import types
from typing import Any

from .. import exceptions as exc
from .runtime import Runtime, TaskContext, task_context
from .serialization import SerializedObject, deserialize, loads, serialize
from .task_spec import ACTOR_CREATION, ACTOR_METHOD, ARG_REF, TASK, TaskSpec

_CoroutineType = types.CoroutineType  # (inspect.iscoroutine: an isinstance of it)


class ExecutionResult:
    """What running a spec produced. ``error`` is the exception (None on success);
    ``retryable`` says whether ``spec.retry_exceptions`` asks for another attempt.
    ``value`` is the task's return value itself: holding it keeps the ObjectRefs
    it contains alive until the caller has stored ``values`` (which pins them),
    so a task may return a ref to an object it made."""

    __slots__ = ("values", "error", "retryable", "value", "stream")

    def __init__(self, values: list[SerializedObject], error: BaseException | None = None,
                 retryable: bool = False, value: Any = None, stream: "Stream | None" = None):
        self.values = values
        self.error = error
        self.retryable = retryable
        self.value = value
        #: A generator call that has not ended: it waits for its consumer (only
        #: where tasks may not block, see `Stream`); `values` is empty.
        self.stream = stream


class _ArgumentFailed(Exception):
    def __init__(self, error: BaseException):
        self.error = error


#: The actors of this process that are restarts (their creation's attempt > 0):
#: ``get_runtime_context().was_current_actor_reconstructed``.
reconstructed_actors: set[bytes] = set()


class ActorInstance:
    """An actor's object plus what it runs on: a lock-free direct call for plain
    methods; an event loop thread for ``async def`` methods."""

    def __init__(self, instance: Any, spec: TaskSpec, own_env: bool = True):
        self.instance = instance
        self.spec = spec
        #: Whether its calls run in the environment they ask for (their runtime_env):
        #: an actor in a process of its own, or one without env_vars.
        self.own_env = own_env or not spec.env_vars
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_lock = threading.Lock()
        self._async_methods: dict[str, tuple] = {}  # name -> (function, is it async)
        #: method name -> its calls' display name (see Executor._execute_plain)
        self.display_names: dict[str, str] = {}

    def is_async(self, name: str, method) -> bool:
        """Whether `method` (the bound method `name`) is ``async def`` (asked
        once per function: inspect is slow next to a call)."""
        function = getattr(method, "__func__", method)
        known = self._async_methods.get(name)
        if known is None or known[0] is not function:
            known = self._async_methods[name] = (function,
                                                 inspect.iscoroutinefunction(method))
        return known[1]

    def loop(self) -> asyncio.AbstractEventLoop:
        with self._loop_lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="beamlet-actor-loop",
                                          daemon=True)
                thread.start()
                self._loop = loop
            return self._loop

    def close(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)


class Executor:
    """Runs specs in this process. One per process; thread-safe."""

    def __init__(self, runtime: Runtime, actors_own_process: bool | None = None):
        """`actors_own_process`: whether each actor runs in a process of its own, so
        that its runtime_env's variables can stay set for its life (default: the
        backend's ``isolated`` flag; False where actors share worker processes)."""
        self.runtime = runtime
        self._actors_own_process = actors_own_process
        self._functions: dict[bytes, Any] = {}
        self.actors: dict[bytes, ActorInstance] = {}
        self.pid = os.getpid()
        #: The actor that called exit_actor(), once one has: the caller ends it
        #: after storing that call's result (see `end_actor`).
        self.exiting: bytes | None = None

    @property
    def actors_own_process(self) -> bool:
        if self._actors_own_process is None:
            return self.runtime.backend.isolated
        return self._actors_own_process

    # -- code -----------------------------------------------------------------
    def add_function(self, function_id: bytes, blob: bytes) -> None:
        """Cache code that arrived with a message (saves a control-store read)."""
        if function_id not in self._functions:
            self._functions[function_id] = loads(blob)

    def function(self, function_id: bytes) -> Any:
        fn = self._functions.get(function_id)
        if fn is None:
            blob = self.runtime.tables.function(function_id)
            if blob is None:
                raise exc.BackendError(f"function {function_id.hex()} is not registered")
            fn = self._functions[function_id] = loads(blob)
        return fn

    # -- arguments ------------------------------------------------------------
    def _resolve(self, spec: TaskSpec) -> tuple[list, dict]:
        if not spec.args and not spec.kwargs:
            return [], {}
        ref_ids = spec.dependencies()
        fetched: dict[bytes, SerializedObject] = {}
        if ref_ids:
            for rid, sobj in zip(ref_ids, self.runtime.backend.object_store.get(ref_ids, None)):
                fetched[rid] = sobj

        def value(entry):
            kind, payload = entry
            sobj = fetched[payload] if kind == ARG_REF else payload
            val = deserialize(sobj)
            if sobj.is_error:
                raise _ArgumentFailed(val)
            return val

        return [value(a) for a in spec.args], {k: value(v) for k, v in spec.kwargs.items()}

    # -- running --------------------------------------------------------------
    def execute(self, spec: TaskSpec) -> ExecutionResult:
        """Run `spec` and return its results; never raises for a task's own failure."""
        if spec.generator is None and not spec.env_vars and len(spec.return_ids) == 1:
            if spec.kind == TASK:
                return self._execute_plain(spec)
            if spec.kind == ACTOR_METHOD:
                actor = self.actors.get(spec.actor_id)
                if actor is not None and actor.own_env:
                    return self._execute_plain(spec, actor)
        with self._task_scope(spec):
            try:
                args, kwargs = self._resolve(spec)
                result = self._call(spec, args, kwargs)
            except BaseException as err:  # noqa: BLE001 - user code may raise anything
                return self._handle(spec, err)
            if spec.generator is not None:
                return self._stream(spec, result).run(block=self.runtime.backend.parallel)
            return self._results(spec, result)

    @contextlib.contextmanager
    def _task_scope(self, spec: TaskSpec, env: bool = True):
        """Run the body as `spec`: its task context (get_runtime_context) and,
        with `env`, its runtime_env's variables set, and put back after."""
        token = task_context.set(TaskContext(spec.task_id, spec.actor_id, spec.display_name,
                                             spec.resources, _placement(self, spec)))
        saved = self._enter_env(spec) if env else None
        try:
            yield
        finally:
            if saved is not None:
                _restore_env(saved)
            task_context.reset(token)

    def _execute_plain(self, spec: TaskSpec, actor: ActorInstance | None = None
                       ) -> ExecutionResult:
        """`execute` of the common task or actor call (one return, no generator,
        no runtime_env to enter; for a call, `actor` is its actor, here): the
        same steps, fewer layers."""
        if actor is None:
            context = TaskContext(spec.task_id, None, spec.function_name, spec.resources,
                                  spec.placement_group)
        else:
            name = spec.method_name
            display = actor.display_names.get(name)
            if display is None:
                display = actor.display_names[name] = spec.display_name
            context = TaskContext(spec.task_id, spec.actor_id, display, spec.resources,
                                  actor.spec.placement_group)
        token = task_context.set(context)
        try:
            try:
                if spec.args or spec.kwargs:
                    args, kwargs = self._resolve(spec)
                else:
                    args, kwargs = (), {}
                if actor is None:
                    fn = self._functions.get(spec.function_id)
                    if fn is None:
                        fn = self.function(spec.function_id)
                    result = fn(*args, **kwargs)
                    if type(result) is _CoroutineType:
                        result = asyncio.run(result)
                else:
                    method = getattr(actor.instance, name, None)
                    if method is None:
                        method = _actor_method(actor.instance, name)
                    known = actor._async_methods.get(name)  # (what actor.is_async does)
                    if known is None or known[0] is not getattr(method, "__func__", method):
                        known = (None, actor.is_async(name, method))
                    if known[1]:
                        result = asyncio.run_coroutine_threadsafe(
                            _with_context(method, args, kwargs), actor.loop()).result()
                    else:
                        result = method(*args, **kwargs)
            except BaseException as err:  # noqa: BLE001 - user code may raise anything
                return self._handle(spec, err)
            try:
                value = serialize(result)
            except TypeError as err:
                return self._failure(spec, exc.TaskError.from_exception(err, spec.display_name,
                                                                         self.pid))
            return ExecutionResult([value], None, False, result)
        finally:
            task_context.reset(token)

    def resume(self, spec: TaskSpec, stream: "Stream",
               stop: BaseException | None = None) -> ExecutionResult:
        """Go on with a generator call that stopped to wait for its consumer
        (`ExecutionResult.stream`), without blocking; `stop`: end it now
        instead, its next item being that error (KeyboardInterrupt: it was
        cancelled)."""
        token = task_context.set(TaskContext(spec.task_id, spec.actor_id, spec.display_name,
                                             spec.resources))
        saved = self._enter_env(spec)
        try:
            if stop is not None:
                return stream.fail(stop)
            return stream.run(block=False)
        finally:
            if saved is not None:
                _restore_env(saved)
            task_context.reset(token)

    def execute_stream(self, spec: TaskSpec):
        """`execute` of a generator call for an engine that holds the producer
        back itself (Ray's streaming generators): a generator that yields None
        after each item it stores (``Backend.put_stream_item``), then the
        call's ExecutionResult. The spec's backpressure limit is not applied
        here: the engine stops asking for the next step instead."""
        with self._task_scope(spec):
            try:
                args, kwargs = self._resolve(spec)
                result = self._call(spec, args, kwargs)
            except BaseException as err:  # noqa: BLE001 - user code may raise anything
                yield self._handle(spec, err)
                return
            stream = self._stream(spec, result)
            stream.limit = 0
            while True:
                try:
                    stream.emit(stream.next_item())
                except StopIteration:
                    break
                except BaseException as err:  # noqa: BLE001
                    yield stream.fail(err)
                    return
                yield None
            yield stream.finish()

    async def execute_async_stream(self, spec: TaskSpec):
        """`execute_stream` of an async actor's generator method, on the running
        event loop (an async generator: an async method's items are awaited)."""
        with self._task_scope(spec, env=False):
            try:
                result = await self._call_async(spec)
            except BaseException as err:  # noqa: BLE001
                yield self._handle(spec, err)
                return
            if inspect.isasyncgen(result):
                stream, agen = Stream(self, spec, None, lambda: None), result
            else:
                stream, agen = self._stream(spec, result), None
            stream.limit = 0
            while True:
                try:
                    stream.emit(await agen.__anext__() if agen is not None
                                else stream.next_item())
                except (StopIteration, StopAsyncIteration):
                    break
                except BaseException as err:  # noqa: BLE001
                    if agen is not None:
                        try:
                            await agen.aclose()
                        except BaseException:  # noqa: BLE001 - the error that ended it counts
                            pass
                    yield stream.fail(err)
                    return
                yield None
            yield stream.finish()

    def _stream(self, spec: TaskSpec, result: Any) -> "Stream":
        """The Stream that runs what a generator call returned: a generator, an
        async generator (an async actor's method: run on the actor's loop) or
        any iterable."""
        if inspect.isasyncgen(result):
            actor = self.actors.get(spec.actor_id)
            loop = actor.loop() if actor is not None else None

            def next_item():
                if loop is None:
                    raise TypeError("an async generator can only run in an async actor")
                try:
                    return asyncio.run_coroutine_threadsafe(result.__anext__(), loop).result()
                except StopAsyncIteration:
                    raise StopIteration from None

            def close():
                if loop is not None:
                    asyncio.run_coroutine_threadsafe(result.aclose(), loop).result()
            return Stream(self, spec, next_item, close)
        try:
            items = iter(result)
        except TypeError:
            err = TypeError(f"{spec.display_name} was called with num_returns="
                            f"{spec.generator[0]!r} but returned {type(result).__name__}, "
                            f"not a generator")
            return Stream(self, spec, _raiser(err), lambda: None)
        return Stream(self, spec, items.__next__, getattr(items, "close", lambda: None))

    def _enter_env(self, spec: TaskSpec) -> dict | None:
        """Set the environment variables of the spec's runtime_env; return what
        to restore after the call (None: nothing). An actor in a process of its
        own keeps them for its life; elsewhere (a task on a pooled worker, any
        call in the caller's process) they last for the call."""
        env = spec.env_vars
        own_process = self.actors_own_process
        if spec.kind == ACTOR_METHOD and not own_process:
            actor = self.actors.get(spec.actor_id)
            env = actor.spec.env_vars if actor is not None else None
        if not env:
            return None
        if spec.kind == ACTOR_CREATION and own_process:
            os.environ.update(env)
            return None
        saved = {name: os.environ.get(name) for name in env}
        os.environ.update(env)
        return saved

    async def _call_async(self, spec: TaskSpec) -> Any:
        """An async actor's method called (and awaited, if it returns an awaitable)."""
        args, kwargs = self._resolve(spec)
        actor = self.actors.get(spec.actor_id)
        if actor is None:
            raise exc.ActorDiedError(f"actor {spec.function_name} is not running here")
        result = _actor_method(actor.instance, spec.method_name)(*args, **kwargs)
        if inspect.isawaitable(result):
            result = await result
        return result

    async def execute_async(self, spec: TaskSpec) -> ExecutionResult:
        """Run an async actor's method call on the running event loop: awaits the
        method, so many calls can be in flight on one loop."""
        with self._task_scope(spec, env=False):
            try:
                result = await self._call_async(spec)
            except BaseException as err:  # noqa: BLE001
                return self._handle(spec, err)
            if spec.generator is not None:
                return await _run_async(self, spec, result)
            return self._results(spec, result)

    def _handle(self, spec: TaskSpec, err: BaseException) -> ExecutionResult:
        if isinstance(err, _ArgumentFailed):
            return self._failure(spec, _input_error(spec, err.error))
        if isinstance(err, (KeyboardInterrupt, asyncio.CancelledError)):
            return self._failure(spec, _cancelled_error(spec, err, self.pid))
        if isinstance(err, exc.ActorError):
            return self._failure(spec, err)
        if isinstance(err, (exc.ActorExit, exc.AsyncioActorExit)) and spec.actor_id is not None:
            from .actor import EXIT_REASON
            if spec.kind == ACTOR_METHOD:
                self.exiting = spec.actor_id
            return self._failure(spec, exc.ActorDiedError(
                f"the actor {spec.function_name.rsplit('.', 1)[0]} is dead: {EXIT_REASON}"))
        if isinstance(err, SystemExit) and spec.kind != ACTOR_METHOD:
            err = RuntimeError(f"task called sys.exit({err.code})")
        wrapped = exc.TaskError.from_exception(err, spec.display_name, self.pid)
        return self._failure(spec, wrapped, _should_retry(spec, err))

    def _call(self, spec: TaskSpec, args: list, kwargs: dict) -> Any:
        if spec.kind == ACTOR_METHOD:
            actor = self.actors.get(spec.actor_id)
            if actor is None:
                raise exc.ActorDiedError(f"actor {spec.function_name} is not running here")
            method = _actor_method(actor.instance, spec.method_name)
            if actor.is_async(spec.method_name, method):
                return asyncio.run_coroutine_threadsafe(_with_context(method, args, kwargs),
                                                        actor.loop()).result()
            return method(*args, **kwargs)
        fn = self.function(spec.function_id)
        if spec.kind == ACTOR_CREATION:
            self.actors[spec.actor_id] = ActorInstance(fn(*args, **kwargs), spec,
                                                       self.actors_own_process)
            if spec.attempt:
                reconstructed_actors.add(spec.actor_id)
            return None
        result = fn(*args, **kwargs)
        if inspect.iscoroutine(result):
            result = asyncio.run(result)
        return result

    def _results(self, spec: TaskSpec, result: Any) -> ExecutionResult:
        n = len(spec.return_ids)
        if n == 1:
            values = [result]
        else:
            try:
                values = list(result)
            except TypeError:
                values = None
            if values is None or len(values) != n:
                got = "a non-sequence" if values is None else f"{len(values)} values"
                err = ValueError(f"{spec.display_name} was declared with num_returns={n} "
                                 f"but returned {got}")
                return self._failure(spec, exc.TaskError.from_exception(err, spec.display_name,
                                                                         self.pid))
        out = []
        for v in values:
            try:
                out.append(serialize(v))
            except TypeError as err:
                return self._failure(spec, exc.TaskError.from_exception(err, spec.display_name,
                                                                         self.pid))
        return ExecutionResult(out, value=result)

    def _failure(self, spec: TaskSpec, error: BaseException, retryable: bool = False):
        try:
            sobj = serialize(error, is_error=True)
        except TypeError:
            sobj = serialize(exc.TaskError(spec.display_name, str(error), None, self.pid),
                             is_error=True)
        return ExecutionResult([sobj] * len(spec.return_ids), error, retryable)

    def end_actor(self, actor_id: bytes) -> None:
        """Run the actor's ``__ray_shutdown__`` (if its class has one), then drop
        it: its graceful end, after exit_actor(). An error in the hook is
        printed, not raised (the actor ends anyway)."""
        actor = self.actors.get(actor_id)
        hook = getattr(actor.instance, "__ray_shutdown__", None) if actor is not None else None
        if hook is not None:
            try:
                result = hook()
                if inspect.iscoroutine(result):
                    asyncio.run(result)
            except BaseException:  # noqa: BLE001 - the actor ends whatever it raises
                import traceback
                traceback.print_exc()
        self.drop_actor(actor_id)

    def drop_actor(self, actor_id: bytes) -> None:
        actor = self.actors.pop(actor_id, None)
        if actor is not None:
            actor.close()


def _placement(executor: Executor, spec: TaskSpec):
    """The placement group a call runs in: its own, or its actor's."""
    if spec.kind == ACTOR_METHOD:
        actor = executor.actors.get(spec.actor_id)
        return actor.spec.placement_group if actor is not None else None
    return spec.placement_group


class Stream:
    """The producing side of one generator call (see ``core/generators.py``).

    `run` stores each item as it is made (``Backend.put_stream_item``), an
    exception raised by the generator (or a cancellation) as the next item,
    then the end-of-stream marker; it returns the call's ExecutionResult, whose
    value for the stream's own id is None (``"dynamic"``: the refs of the items).
    With a backpressure limit it holds back while the consumer is that many
    items behind: blocking where tasks may block, else (``block=False``, the
    in-process backend) it returns an ExecutionResult whose `stream` is this
    one, to be resumed (``Executor.resume``) once one of `waiting_for` exists.
    A retried attempt (``spec.attempt > 0``) is not held back: its consumer may
    be past what it has made.
    """

    def __init__(self, executor: Executor, spec: TaskSpec, next_item, close):
        self.executor = executor
        self.spec = spec
        self.stream_id = spec.return_ids[0]
        self.dynamic = spec.generator[0] == "dynamic"
        limit = spec.generator[1]
        #: Items delivered by earlier attempts: made again, not stored again.
        self.skip = spec.generator[2] if len(spec.generator) > 2 else 0
        self.limit = limit if limit > 0 and spec.attempt == 0 and not self.dynamic else 0
        self.next_item = next_item
        self.close = close
        self.index = 0
        self.consumed = 0  # items the consumer is known to have taken
        self.waiting_for: list[bytes] = []
        self.refs: list = []  # ("dynamic": the items' refs)

    def run(self, block: bool) -> ExecutionResult:
        try:
            while True:
                if self.limit and self.index - self.consumed >= self.limit:
                    stop = self.wait_for_consumer(block)
                    if stop is None:
                        return ExecutionResult([], stream=self)
                    if stop:
                        self.close()
                        break
                try:
                    value = self.next_item()
                except StopIteration:
                    break
                self.emit(value)
        except BaseException as err:  # noqa: BLE001 - user code may raise anything
            return self.fail(err)
        return self.finish()

    def window(self) -> list[bytes]:
        """The ids one of which lets a held-back producer go on: the consumer's
        acknowledgement of an item late enough that at most half the limit is
        left unconsumed (or of a later one: only the newest is kept; only every
        `ack_step`-th item is acknowledged), then the mark that the consumer
        is gone."""
        from .generators import ack_id, ack_step, closed_id
        target = self.index - self.limit + max(1, self.limit // 2)  # consumed >= target
        step = ack_step(self.limit)
        first = target - 1 + (-target) % step  # (the first j >= target - 1 with step | j + 1)
        return [ack_id(self.stream_id, j) for j in range(first, self.index, step)] + \
            [closed_id(self.stream_id)]

    def wait_for_consumer(self, block: bool) -> bool | None:
        """Wait until the consumer has caught up: False; True if it is gone (the
        producer stops); None if `block` is False and it has not caught up."""
        ids = self.window()
        present = self.executor.runtime.backend.object_store.wait(
            ids, 1, None if block else 0)
        return self.caught_up(ids, present)

    def caught_up(self, ids: list[bytes], present) -> bool | None:
        if not present:
            self.waiting_for = ids
            return None
        if ids[-1] in present:
            return True
        # (An id's last 8 bytes are the index of the item it acknowledges.)
        self.consumed = max(int.from_bytes(i[-8:], "little") for i in present) + 1
        return False

    def emit(self, value: Any) -> None:
        from .generators import item_id
        try:
            sobj = serialize(value)
        except TypeError as err:
            raise TypeError(f"item {self.index} of {self.spec.display_name} could not be "
                            f"serialized: {err}") from None
        object_id = item_id(self.stream_id, self.index)
        if self.dynamic:
            from .object_ref import ObjectRef
            self.refs.append(ObjectRef(object_id))
        if self.index >= self.skip:
            self.executor.runtime.backend.put_stream_item(object_id, sobj)
        self.index += 1

    def fail(self, err: BaseException) -> ExecutionResult:
        """Store the error `err` (raised by the generator, or while it was held
        back) as the next item and end the stream. Never retried: the items
        before it were delivered."""
        from .generators import item_id
        try:
            self.close()
        except BaseException:  # noqa: BLE001 - the error that ended it is what counts
            pass
        failure = self.executor._handle(self.spec, err)
        object_id = item_id(self.stream_id, self.index)
        if self.dynamic:
            from .object_ref import ObjectRef
            self.refs.append(ObjectRef(object_id))
        if self.index >= self.skip:
            self.executor.runtime.backend.put_stream_item(object_id, failure.values[0])
        self.index += 1
        result = self.finish()
        result.error = failure.error
        return result

    def finish(self) -> ExecutionResult:
        from .generators import DynamicObjectRefGenerator, end_marker, item_id
        if self.dynamic:
            refs = self.refs
            return ExecutionResult([serialize(DynamicObjectRefGenerator(refs))], value=refs)
        if self.index >= self.skip:
            self.executor.runtime.backend.put_stream_item(item_id(self.stream_id, self.index),
                                                          end_marker())
        return ExecutionResult([serialize(None)])


async def _run_async(executor: Executor, spec: TaskSpec, result: Any) -> ExecutionResult:
    """`Stream.run` on an async actor's event loop: an async generator is
    awaited item by item, and waiting for the consumer blocks a thread of the
    loop's executor, never the loop (other calls go on meanwhile)."""
    loop = asyncio.get_running_loop()
    if inspect.isasyncgen(result):
        stream, agen = Stream(executor, spec, None, lambda: None), result
    else:  # (a plain generator: its items are made on the loop, like a plain method)
        stream, agen = executor._stream(spec, result), None
    try:
        while True:
            if stream.limit and stream.index - stream.consumed >= stream.limit:
                if await loop.run_in_executor(None, stream.wait_for_consumer, True):
                    if agen is not None:
                        await agen.aclose()
                    else:
                        stream.close()
                    break
            try:
                value = await agen.__anext__() if agen is not None else stream.next_item()
            except (StopIteration, StopAsyncIteration):
                break
            stream.emit(value)
    except BaseException as err:  # noqa: BLE001 - user code may raise anything
        if agen is not None:
            try:
                await agen.aclose()
            except BaseException:  # noqa: BLE001 - the error that ended it is what counts
                pass
        return stream.fail(err)
    return stream.finish()


def _raiser(err: BaseException):
    def raise_it():
        raise err
    return raise_it


def _actor_method(instance: Any, name: str):
    """The bound method `name` of an actor instance, or one of the methods every
    actor has in Ray (``__ray_ready__``, ``__ray_terminate__``) that its class
    does not define."""
    try:
        return getattr(instance, name)
    except AttributeError:
        if name == "__ray_ready__":
            return lambda: True
        if name == "__ray_terminate__":
            from .actor import exit_actor
            return exit_actor
        raise


def _restore_env(saved: dict) -> None:
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


async def _with_context(method, args, kwargs):
    return await method(*args, **kwargs)


def _input_error(spec: TaskSpec, upstream: BaseException) -> BaseException:
    if isinstance(upstream, exc.TaskError):
        return exc.TaskError(spec.display_name, upstream.traceback_str, upstream.cause,
                             upstream.pid, input_failed=True).as_instanceof_cause()
    return upstream  # system errors (cancelled, crashed, lost) propagate as they are


def _cancelled_error(spec: TaskSpec, err: BaseException, pid: int) -> BaseException:
    import traceback
    tb = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    cause = exc.TaskCancelledError(f"task {spec.display_name} was cancelled")
    return exc.TaskError(spec.display_name, tb, cause, pid).as_instanceof_cause()


def _should_retry(spec: TaskSpec, err: BaseException) -> bool:
    retry = spec.retry_exceptions
    if not retry:
        return False
    if retry is True:
        return isinstance(err, Exception)
    return isinstance(err, tuple(retry))
