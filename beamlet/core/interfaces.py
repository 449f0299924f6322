"""The four interfaces every backend implements, and the Backend bundle.

Nothing above ``beamlet.core`` imports a backend; it drives these. Each
process that uses beamlet (the driver, and every worker that runs tasks which
submit tasks or call ``get``) holds one Backend: in the driver it is the real
thing, in a worker it is the backend's client side, built by the backend
itself. The Runtime (``core/runtime.py``) puts Ray's semantics on top: it
builds TaskSpecs, decides what travels inline, resolves errors and counts
references; the components only store, move and run.

    ObjectStore   serialized objects by id: put, blocking get, wait, delete
    ControlStore  small metadata (functions, actors, nodes) + compare-and-set, pub/sub
    Transport     messages between processes or machines
    Scheduler     runs TaskSpecs where resources allow, stores their results

Every blocking method takes a timeout (seconds, ``None`` = no limit) and raises
``GetTimeoutError`` when it runs out; none may block forever once the backend
shuts down (they raise ``BackendError`` instead).
"""
from __future__ import annotations

import abc
from typing import Any, Callable, ClassVar, Iterable, NamedTuple, Sequence

from .serialization import SerializedObject
from .task_spec import TaskSpec


class ObjectStore(abc.ABC):
    """Holds immutable serialized objects by ObjectID.

    Contract:
    - An id is written once (`put`, or a scheduler storing a task's result);
      writing it again is ignored (a retried task may finish twice).
    - `get` blocks until every id is present, then returns them in order;
      the returned buffers may be read-only views of shared memory (zero copy)
      and stay valid as long as the caller holds them.
    - `delete` frees the objects; the Runtime calls it when no reference is
      left anywhere. Getting a deleted id raises ``ObjectLostError``. Deleting
      an id whose value has not arrived yet discards the value when it does.
    - The refs a stored object contains (``SerializedObject.refs``) are kept
      alive through the ReferenceCounter until the object is deleted.
    - An object stored with ``is_error`` is returned like any other; raising
      it is the Runtime's job.
    """

    @abc.abstractmethod
    def put(self, object_id: bytes, value: SerializedObject) -> None:
        """Store `value` under `object_id` and wake everyone waiting for it."""

    @abc.abstractmethod
    def get(self, object_ids: Sequence[bytes], timeout: float | None = None,
            fail_fast: bool = False) -> list[SerializedObject]:
        """The objects, in order, once all are present; ``GetTimeoutError`` after `timeout`.

        `fail_fast`: return as soon as one of them is present as an error, with
        None in place of the objects still missing (a store may ignore it and
        wait for all: that is slower to fail, never wrong)."""

    @abc.abstractmethod
    def wait(self, object_ids: Sequence[bytes], num_returns: int,
             timeout: float | None = None) -> set[bytes]:
        """Block until at least `num_returns` of the ids are present or `timeout`
        passes (0 polls); return a set of present ids: all of them, or (when at
        least `num_returns` are present) any `num_returns` or more of them. The
        Runtime picks the first `num_returns` in input order from what it gets,
        so a store should prefer the earliest ids and may stop looking once it
        has found `num_returns` (that keeps a wait loop over a long list linear)."""

    @abc.abstractmethod
    def contains(self, object_id: bytes) -> bool:
        """Whether the object is present now (never blocks)."""

    @abc.abstractmethod
    def delete(self, object_ids: Iterable[bytes]) -> None:
        """Free the objects; unknown ids are ignored."""

    @abc.abstractmethod
    def on_ready(self, object_id: bytes, callback: Callable[[bytes], Any]) -> None:
        """Call ``callback(object_id)`` once the object is present: at once (in
        the calling thread) if it already is, else from whichever thread stores
        it; also when its value arrives after a `delete` and is discarded."""

    def stats(self) -> dict:
        """Usage figures for status displays: at least ``num_objects`` and ``bytes_used``."""
        return {}


class ControlStore(abc.ABC):
    """Small durable metadata, shared by every process of a cluster (the GCS).

    Keys live in named tables. A key is bytes or str, and a str key is the same
    key as its UTF-8 encoding (`keys` returns bytes). Values are bytes (callers
    serialize; ``core/tables.py`` holds the tables beamlet itself keeps).
    Single-key operations are atomic: `compare_and_set` is the primitive every
    read-modify-write is built on, so that processes sharing a store never
    lose each other's updates. Subscribers of a channel receive each message
    published after they subscribed, in publish order.

    On Redis a table is a hash (key = field): `get`/`put`/`delete`/`keys` are
    HGET/HSET (HSETNX)/HDEL/HKEYS, and `compare_and_set` is one Lua script (or
    WATCH, HGET, MULTI, HSET/HDEL, EXEC).
    """

    @abc.abstractmethod
    def put(self, table: str, key: str | bytes, value: bytes, overwrite: bool = True) -> bool:
        """Store the value; return False (and store nothing) if the key exists
        and `overwrite` is False: then it is an atomic insert-if-absent, the
        same as ``compare_and_set(table, key, None, value)``."""

    @abc.abstractmethod
    def compare_and_set(self, table: str, key: str | bytes, expected: bytes | None,
                        new: bytes | None) -> bool:
        """Atomically: if the key's value equals `expected` (None: the key is
        absent), make it `new` (None: delete the key) and return True; otherwise
        change nothing and return False.

        So ``expected=None`` is insert-if-absent and ``new=None`` is
        delete-if-equal. A caller that lost (False) re-reads and retries; one
        whose comparison held knows that nobody wrote the key between its read
        and its write."""

    @abc.abstractmethod
    def get(self, table: str, key: str | bytes) -> bytes | None:
        """The value, or None."""

    @abc.abstractmethod
    def delete(self, table: str, key: str | bytes) -> bool:
        """Remove the key; return whether it was there."""

    @abc.abstractmethod
    def keys(self, table: str) -> list:
        """All keys of the table."""

    @abc.abstractmethod
    def publish(self, channel: str, message: bytes) -> None:
        """Deliver `message` to the channel's current subscribers."""

    @abc.abstractmethod
    def subscribe(self, channel: str, callback: Callable[[bytes], Any]) -> Callable[[], None]:
        """Call `callback(message)` for each later message; returns an unsubscribe function."""

    def close(self) -> None:
        """Release connections; the data may outlive this client."""


class Connection(abc.ABC):
    """One ordered, reliable, bidirectional message channel."""

    @abc.abstractmethod
    def send(self, message: Any) -> None:
        """Send one picklable message; raises ``BackendError`` if the peer is gone."""

    @abc.abstractmethod
    def recv(self, timeout: float | None = None) -> Any:
        """The next message; ``GetTimeoutError`` after `timeout`, ``EOFError`` when the peer closed."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close the channel; the peer's `recv` raises EOFError."""

    def fileno(self) -> int:
        """A file descriptor that is readable when `recv` will not block, for selectors."""
        raise NotImplementedError

    def recv_all(self) -> list:
        """Every message that has arrived, without blocking (possibly none);
        ``EOFError`` when the peer closed and nothing is left. For one reader
        thread (an event loop) that drains the connection when its `fileno`
        is readable."""
        raise NotImplementedError


class Transport(abc.ABC):
    """Makes Connections between processes: pipes and Unix sockets on one
    machine, ZeroMQ/TCP between machines. Messages are small (control and
    inline values); large payloads go through the ObjectStore.

    A transport is made with the session's secret: `connect` and `accept`
    yield only connections whose peer proved it holds it (``core/auth.py``),
    before anything the peer sent is unpickled."""

    @abc.abstractmethod
    def listen(self, address: str | None = None) -> "Listener":
        """Start accepting connections at `address` (None: a fresh private one)."""

    @abc.abstractmethod
    def connect(self, address: str, timeout: float | None = None) -> Connection:
        """Connect to a Listener's address; ``BackendError`` if nothing answers in time."""


class Joined(NamedTuple):
    """A peer connected and proved it holds the secret (`Listener.poll`)."""
    conn: Connection


class Received(NamedTuple):
    """Messages from a joined peer, in the order it sent them (`Listener.poll`)."""
    conn: Connection
    messages: list


class Left(NamedTuple):
    """A joined peer is gone (`Listener.poll`): it closed or died (`error` None),
    or broke the protocol (`error` says how; the listener closed it)."""
    conn: Connection
    error: BaseException | None


class Listener(abc.ABC):
    """The accepting end of a Transport.

    A process serving many peers (a node's I/O loop) does not block in
    `accept`: it selects on the listener's `fileno` and calls `poll`, which
    authenticates newcomers without waiting on any of them and reads every
    joined peer. Peers refused at the handshake are logged by the listener
    and never reported.
    """

    address: str

    def fileno(self) -> int:
        """A file descriptor that is readable when `poll` has something to report."""
        raise NotImplementedError

    def poll(self) -> "list[Joined | Received | Left]":
        """What happened since the last call, without blocking, in order per
        peer: `Joined` before the peer's first `Received`, nothing after its
        `Left`. Also does the listener's timed chores (giving up handshakes
        past their deadline), so call it at least once a second even when
        `fileno` stays quiet. One thread calls it; `Connection.send` on the
        connections it reports may be called from any thread."""
        raise NotImplementedError

    @abc.abstractmethod
    def accept(self, timeout: float | None = None) -> Connection:
        """The next incoming connection; ``GetTimeoutError`` after `timeout`."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop accepting and free the address."""


class Scheduler(abc.ABC):
    """Runs TaskSpecs and stores their results in the ObjectStore.

    Contract:
    - `submit` returns at once. The task waits for its dependencies (without
      holding resources), then runs where its resource request fits.
    - Every return id eventually gets a value: the result, or an error object
      (``TaskError`` for an exception in user code, ``WorkerCrashedError``,
      ``TaskCancelledError``, ``ActorDiedError``...). A dependency stored as an
      error is passed to the task's executor, which fails the task with it.
    - Calls to one actor from one caller run in submission order.
    - A request that no node can ever satisfy raises ``ValueError`` from
      `submit`, naming the resource.
    - Failures are retried per ``spec.max_retries`` (worker died) and
      ``spec.retry_exceptions`` (user exception); actors are restarted per
      ``actor_options["max_restarts"]``.
    """

    #: Set by the driver's task record (core/task_events.py) where the
    #: backend has the ``task_events`` flag: a scheduler that tells how its
    #: tasks progress calls it with ``(task_id, attempt, state, pid,
    #: time.perf_counter())`` when an attempt waits for its arguments
    #: (``"PENDING_ARGS_AVAIL"``), has them (``"PENDING_NODE_ASSIGNMENT"``),
    #: is sent behind earlier calls to its actor (``"SUBMITTED_TO_WORKER"``)
    #: or starts (``"RUNNING"``). None: nobody listens.
    task_progress = None

    #: Optional: ``submit_plain_call(actor_id, method_name, args, return_id) ->
    #: bool``, a plain actor call (``handle.method.remote(*args)``: no
    #: ``.options()``, keywords, actor options or env_vars, one return; `args`
    #: as a spec holds them) submitted without its spec, its one result under
    #: `return_id`; False (and nothing done) if it must go as a spec through
    #: `submit` after all. Used only where nobody listens to
    #: ``beamlet_task_submitted`` (a spec-less call tells no hook) and the
    #: runtime pins no arguments. None: every call goes through `submit`.
    submit_plain_call = None

    @abc.abstractmethod
    def submit(self, spec: TaskSpec) -> None:
        """Queue a task, actor creation or actor method call."""

    @abc.abstractmethod
    def cancel(self, object_id: bytes, force: bool = False, recursive: bool = True) -> None:
        """Cancel the task that produces `object_id`: a queued task is dropped,
        a running one is interrupted (``force``: its worker is killed). Its
        results become ``TaskCancelledError``. Finished tasks are left alone.
        `recursive`: the tasks it (a task or an actor call) submitted (not
        actors or actor calls) that have not finished are cancelled too, and
        theirs, with the same `force`."""

    @abc.abstractmethod
    def kill_actor(self, actor_id: bytes, no_restart: bool = True) -> None:
        """Stop the actor's process; queued and later calls raise ``ActorDiedError``
        (unless it restarts: ``no_restart=False`` and restarts are left)."""

    def actor_exited(self, actor_id: bytes) -> None:
        """The actor called ``exit_actor()``, and its process ends by itself after
        its ``__ray_shutdown__`` and atexit handlers: fail its queued and later
        calls with ``ActorDiedError`` saying so, and never restart it. (This
        default ends it like ``kill_actor``.)"""
        self.kill_actor(actor_id, True)

    @abc.abstractmethod
    def total_resources(self) -> dict[str, float]:
        """Everything the scheduler can hand out, e.g. ``{"CPU": 8.0, "GPU": 0.0}``."""

    @abc.abstractmethod
    def available_resources(self) -> dict[str, float]:
        """What is not held by running tasks and actors now."""

    def create_placement_group(self, info) -> None:
        """Reserve the bundles of placement group `info` (a
        ``tables.PlacementGroupInfo``) atomically as soon as they fit; then
        mark it CREATED in the control store and store the group under
        ``info.ready_id``. ValueError at once if they could never fit. Only
        where the backend's ``placement_groups`` flag is set."""
        raise ValueError("this backend does not support placement groups")

    def remove_placement_group(self, pg_id: bytes) -> None:
        """Give back the group's reservation (or stop waiting for it; its ready
        ref then holds an error), end the actors and fail the queued tasks
        scheduled in it."""
        raise ValueError("this backend does not support placement groups")

    def shutdown(self) -> None:
        """Stop every worker and actor this scheduler started."""


class Backend(abc.ABC):
    """A named bundle of the four components, as one process sees them.

    Capability flags (class attributes) tell the Runtime and the libraries what
    they may rely on, in the manner of joblib's backends:

    - ``parallel``: tasks may run at the same time (False: each runs inside
      ``.remote()``, in the caller's thread).
    - ``isolated``: tasks run in other processes, so globals are not shared.
    - ``zero_copy``: large buffers come back from ``get`` as shared-memory views.
    - ``multi_node``: tasks may run on other machines.
    - ``node_affinity``: the scheduler runs a call on the node its
      ``NodeAffinitySchedulingStrategy`` names: the request then holds
      `core.placement.node_affinity_key` (see `placement_request`), which the
      scheduler takes out before placing it. False: soft=False is refused
      when there are several nodes.
    - ``placement_groups``: the scheduler reserves placement groups' bundles
      and runs tasks in them (``Scheduler.create_placement_group``).
    - ``concurrency_groups``: actors honour ``concurrency_groups`` (a limit per
      group of methods); elsewhere an actor asking for them is refused.
    - ``manages_workers``: beamlet itself runs the processes tasks and actors
      run in, so their failures follow beamlet's rules: a crashed worker's
      task is retried per ``max_retries``, a crashed actor restarted per
      ``max_restarts``, ``cancel(force=True)`` ends the task's process, a task
      holds every CPU it asks for, and an actor holds its resources while it
      lives. False where an engine beneath
      (Dask) owns the workers and applies its own rules.
    - ``task_events``: the driver's observer hooks hear every task's submission
      and end (nested ones too), and `workers` lists the processes, so the
      state API (``beamlet.util.state``) and ``beamlet.timeline()`` work.
    - ``streaming_generators``: generator tasks and actor methods
      (``num_returns="streaming"`` or ``"dynamic"``, see ``core/generators.py``)
      run here: their items are stored as they are made (`put_stream_item`)
      and a consumer's acknowledgements reach the producer through the object
      store. False: ``.remote()`` of one raises NotImplementedError.

    - ``owner_fate_sharing``: Ray's ownership model: the objects a process
      creates (the results of the tasks it submits, its ``put``s) are lost
      with it, so once a task that submitted children dies (e.g. killed by
      ``cancel(force=True)``), ``get`` of its children's refs raises
      ``OwnerDiedError``. False: the node keeps every object while a ref to
      it lives anywhere.
    - ``actors_lend_cpus``: an actor blocked in ``get``/``wait`` lends its CPUs
      to other work until it resumes, as a blocked task does, so actors
      holding every CPU can wait on tasks. False (Ray): an actor keeps its
      resources while it blocks; only tasks lend theirs.
    - ``prompt_state``: every process sees a change of state as soon as it is
      made: ``available_resources()`` counts a task's request while it runs,
      a call made after an actor's crash waits for its restart, and an object
      is lost as soon as calls to its dead owner fail. False (Ray): these
      reach a process asynchronously (Ray's GCS and owners tell them within
      a second or two), so they are seen late; a call sent before the caller
      learnt of the crash fails as the crashing call did.

    ``inline_threshold`` is the size below which values travel inside messages
    rather than through the object store.
    """

    name: ClassVar[str] = "?"
    parallel: ClassVar[bool] = False
    isolated: ClassVar[bool] = False
    zero_copy: ClassVar[bool] = False
    multi_node: ClassVar[bool] = False
    node_affinity: ClassVar[bool] = False
    placement_groups: ClassVar[bool] = False
    concurrency_groups: ClassVar[bool] = False
    manages_workers: ClassVar[bool] = True
    task_events: ClassVar[bool] = False
    streaming_generators: ClassVar[bool] = False
    owner_fate_sharing: ClassVar[bool] = False
    actors_lend_cpus: ClassVar[bool] = True
    prompt_state: ClassVar[bool] = True
    inline_threshold: ClassVar[int] = 100 * 1024
    #: True where this process owns the objects it creates (the driver); a
    #: worker's client side forwards submissions to the owner, which pins
    #: their arguments.
    owns_objects: ClassVar[bool] = True
    #: True where the engine beneath keeps a task's ref arguments (and the
    #: refs inside its inline ones) alive until the task ends, as Ray does:
    #: the owner's Runtime then does not pin them itself (`Runtime.accept`).
    engine_keeps_arguments: ClassVar[bool] = False
    #: True where a by-value argument above `inline_threshold` is better `put`
    #: (the task gets a ref) than copied into the task: where a put sends the
    #: bytes at once, as a copy would take them, and the task travels without
    #: them (always so where `zero_copy`).
    large_arguments_by_ref: ClassVar[bool] = False

    object_store: ObjectStore
    control_store: ControlStore
    scheduler: Scheduler
    transport: Transport | None = None

    #: Ids used by get_runtime_context(); backends fill them in.
    node_id: str = ""
    worker_id: str = ""

    def nodes(self) -> list[dict]:
        """One dict per node: ``NodeID``, ``Alive``, ``Resources``, ``NodeManagerAddress``."""
        return [{"NodeID": self.node_id, "Alive": True,
                 "Resources": self.scheduler.total_resources(),
                 "NodeManagerAddress": "127.0.0.1"}]

    def workers(self) -> list[dict]:
        """One dict per process that runs (or ran) this job's tasks: ``worker_id``,
        ``pid``, ``is_alive``, ``worker_type`` (``"WORKER"`` or ``"DRIVER"``),
        ``state`` and ``actor_id`` (hex, or None). Backends whose ``task_events``
        flag is False need not know them."""
        raise NotImplementedError(f"the {self.name!r} backend cannot list its workers")

    def settle_task_events(self) -> None:
        """(The driver, where the backend has the ``task_events`` flag.) Called
        before the task record is read: a backend whose events reach the driver
        after the results they belong to returns once the record holds the end
        of every task whose result is ready here (waiting a bounded time).
        Elsewhere nothing to do."""

    def object_referenced(self, object_id: bytes) -> None:
        """This process now holds a reference to the object (its count went 0 -> 1).
        The owner's backend needs nothing; a worker's tells the owner it borrows it."""

    def object_released(self, object_id: bytes) -> None:
        """No reference to the object is left in this process (count 1 -> 0).
        The owner's backend frees it; a worker's tells the owner it let go."""
        self.object_store.delete([object_id])

    def put_stream_item(self, object_id: bytes, value: SerializedObject) -> None:
        """Store one item of a generator task running in this process. Unlike a
        `put`, the item belongs to the job's owner (the generator's caller), not
        to this process: it outlives the producer. Stored in the order called."""
        self.object_store.put(object_id, value)

    def preload(self, modules: list[str]) -> None:
        """A hint: import `modules` where this backend's new workers start from,
        so that they start with them imported (a library about to make many
        workers, e.g. beamlet.tune's trial actors). Default: nothing."""

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Stop everything this backend started in this process and below it:
        processes, shared memory, temp files, threads. Idempotent."""
