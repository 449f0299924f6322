"""A node daemon's side of the drivers that run tasks on it.

`DriverOwner` is the job owner (``local/node.py:JobOwner``) of a daemon's
`Node`: the node engine runs unchanged, and this class stands in for the
drivers connected over ZeroMQ (the messages are in ``protocol.py``).

- ``RunTask``: the values of the task's arguments that came with it are
  stored in the node's store (held until the task's results are out), the
  ones held on other nodes are pulled from there (``objects.Puller``), and
  the rest are fetched from the driver; then the spec goes to the node's
  scheduler. Each small result holding no refs goes to the driver as it
  comes from the worker, without being stored here (an actor's creation
  result and a generator's are stored, then sent, and the node's copy
  freed; so is a small result holding refs); a large one (in shared memory) stays
  here, held for the driver, which is told where it is (``Located``) and
  lets go of it with ``Release``. A copy pulled here is held and reported
  the same way, so the driver frees every copy.
- What a node holds for drivers is recorded in the control store's object
  locations table off the hot path: `locations` queues each change, and a
  thread of the daemon writes them (`record_locations`).
- A node serves ``Pull`` requests from its store (``objects.serve_pull``).
- Direct channels (``direct.py``): ``DirectOpen`` has an actor's worker
  connect to the driver that asked; its results that are large or hold refs
  come back here (the worker's ``DirectDone``) and go to that driver as the
  node's own calls' results do; ``DirectLost`` names the calls a channel
  lost, answered once the node saw the worker die as that worker's calls in
  flight (`_rerun_lost`), before that driver's later calls of the actor.
- A worker's nested submission (`accept`) goes to the driver, with the
  values of its arguments that this node holds; a worker's get of an object
  the node lacks asks the driver for it (`fetch`, the node's hook), which
  answers with the value or where to pull it from.
- An actor's creation result (its token) is held until the driver lets go
  of the actor (``Release``) or leaves: then the node's scheduler ends it.
- Refs the node's workers hold (the Node's `pin`/`unpin`) are counted for
  the driver, which owns the objects: it hears when the first is held here
  and when the last goes (``Borrow``), so it never frees what a worker here
  still holds (e.g. refs kept in an actor).
- What the node's scheduler tells its observers (a task attempt's end, an
  actor's state) goes to the driver whose task or actor it is
  (``TaskFinished``, ``ActorState``), for the driver's hooks (task ends only
  to a driver whose plugins observe them: ``task_events`` in its job
  settings); so do the CPUs it lends out while a task or actor waits in get
  or wait, and takes back (``Lent``), for the driver's spillback; objects a dead
  worker put die in the drivers too (``OwnerDied``). A recursive cancel
  cancels the children the node runs, and names the others to the driver
  (``CancelChildren``); so does a worker's cancel of tasks its driver placed
  elsewhere (`DriverLink.cancel_elsewhere`: e.g. an actor call's children).

Each driver is a job of the node (its `DriverLink` is the job, for the
node's scheduler: ``LocalScheduler.job_of`` names a task's job, the driver
that sent it; an actor's is the one that created it). A worker runs the
tasks of one job only: it is started for the job of the task that waits for
it, with that driver's settings (sys.path, cwd, runtime_env, metadata),
which it keeps, and an idle worker is given only its job's tasks. So what a
worker sends about its task goes to the driver that owns the task: its
nested submissions (`DriverLink.accept`), the objects it needs that the
node lacks (``fetch``), the refs it holds (``pin``/``unpin``), and the
objects it put that leave with them. Several drivers run side by side; when
one leaves, its idle workers are let go (its busy ones once they are idle,
``LocalScheduler.job_ended``) and the others' work goes on.
An actor's calls run in its creator's job, whoever calls it (a named actor
used by a second driver), as in Ray: the call's results go to the caller,
which owns them (a large one is kept here for it until it lets go, whoever
else leaves), but what its worker submits, fetches and holds goes to the
creator, so a ref of the caller's that the actor keeps is not counted for
the caller. When the creator leaves, its actors end (the node's scheduler
ends an actor whose token nobody holds: later calls raise
``ActorDiedError``), except the detached ones and the actors a detached
actor created (Ray: their owner is that actor, not the driver; their
creation names it, ``OWNER_KEY``, and they end once the control store says
it is dead: `check_owners`): their job lives on here (`DriverLink.left`)
until the last of them is dead. What their workers submit from then on is
owned by an heir this node starts on the first such submission
(``heir.py``; `_successor`), or, without one, by this node (`adopt`), as
Ray's actor worker owns its tasks: they run on this node (the actor's),
their results are stored here for the refs the workers hold, and freed once
none is (an actor killed lets go of all of its); a call returning such a ref
ships the object to the calling driver, as any result holding refs. What
the workers then wait for that is not here and not being made here was the
creator's: it is lost with it (``OwnerDiedError``); a result of the
creator's that a task here still makes is stored here for them. So is one
that a detached actor here submitted while the creator was here and that
another node makes (Ray: the actor owns it): its spec says so
(``CLAIMABLE_KEY``), that node keeps it a while once made (`CLAIM_GRACE`),
and the actor's node claims it from every alive node
(``Claim``, `send_claims`): the one making or holding it sends it once made;
if none does (the driver left before placing the task, or its node died),
the task is submitted again if its ``max_retries`` allow (`_claims_lost`),
else its results are lost with the driver.
"""
from __future__ import annotations

import collections
import hmac
import os
import sys
import threading
import time
import traceback

from ... import exceptions as exc
from ...core import plugins
from ...core.generators import _is_end, ack_id, closed_id, item_id
from ...core.refcount import ReferenceCounter
from ...core.scheduling import RETRYING, may_retry
from ...core.serialization import serialize
from ...core.tables import ActorState, NodeState
from ...core.task_spec import ACTOR_CREATION, ACTOR_METHOD, TASK, TaskSpec
from ..local import protocol as LP
from ..local.protocol import ShmEntry
from ..local.transport import ProtocolError
from . import protocol as P
from .objects import Puller, serve_pull

REFETCH_DELAY = 0.2  # seconds before asking the driver again for an object a pull missed
#: Bytes of small results queued for a driver during a turn of the node's
#: loop past which they are sent at once.
RESULTS_BATCH_BYTES = 4 << 20
#: Streams that ended whose consumers' late acknowledgements are dropped
#: (not stored here for nobody), the newest this many.
ENDED_STREAMS_KEPT = 1024
#: Seconds a call of an actor this node has not heard of waits for its
#: creation (another driver's, on a connection of its own) before it fails.
EARLY_CALL_WAIT = 10.0
#: Seconds what a job's workers ask of its heir waits for the heir to join;
#: then the node does without one (see DriverOwner._heir_failed).
HEIR_START_WAIT = 30.0
#: Seconds a lost direct channel's calls wait for this node to see its worker
#: die (see direct.py's "Failures").
LOST_WAIT = 5.0
#: What a job's workers ask for while its heir joins: kept for it (see
#: DriverOwner._successor).
_LATER = object()
#: The key of a creation's ``actor_options`` naming the detached actor that
#: created it (its owner, with which it lives and dies once the driver of
#: their job left: see DriverOwner.driver_left).
OWNER_KEY = "owner_actor"
#: The key of a nested task's ``actor_options`` naming the node of the
#: detached actor that submitted it (which claims its results if the driver
#: leaves before sending it them: see DriverOwner.send_claims), and the
#: seconds another node that made such a result keeps it for that claim.
CLAIMABLE_KEY = "detached_submitter"
CLAIM_GRACE = 10.0
#: Seconds between looks in the control store for the owners of the actors
#: kept for them (see DriverOwner.check_owners).
OWNERS_INTERVAL = 1.0


class DriverLink:
    """One connected driver, as its node sees it: a job of the node, and the
    JobOwner (``local/node.py``) of that job's workers."""

    def __init__(self, owner: "DriverOwner", conn, job_config: dict):
        self.owner = owner
        self.conn = conn
        self.config = job_config
        #: Whether its driver's plugins observe each attempt's end (see
        #: ClusterBackend.job_config): then it is sent ``TaskFinished``.
        self.task_events = bool(job_config.get("task_events"))
        self.tokens: set[bytes] = set()  # actor tokens held for it
        self.groups: set[bytes] = set()  # its placement groups with bundles here
        self.held: set[bytes] = set()  # objects kept here for it (until Release)
        #: Small results stored during a turn of the node's loop, to go in one
        #: ``Objects`` at its end (see DriverOwner.defer_results); every other
        #: message to the driver first sends these, so the order is kept.
        self.results: list = []
        self.results_bytes = 0
        self.results_lock = threading.Lock()
        #: TaskFinished / TaskProgress of its tasks, to go before the next
        #: results (in one ``Report``), or at the daemon's next tick.
        self.events: list = []
        #: Its detached actors (created by it, here); `left`: the driver is gone
        #: and the job lives on in those still alive (see DriverOwner.adopt).
        self.detached: set[bytes] = set()
        self.left = False
        self.ended = False  # (its driver left, and then its last detached actor here died)
        #: Once its driver left (`left`): the heir that owns what the job's
        #: workers submit from then on (the DriverLink of a driver this node
        #: started, ``heir.py``), if one joined; `waiting`: what the workers
        #: asked of it while it joins, ``[(what, argument)]``, done once it
        #: has joined (or failed to: then as if no heir, see DriverOwner.adopt).
        self.heir: DriverLink | None = None
        self.waiting: list | None = None
        self.heir_lock = threading.Lock()
        #: While its heir starts: the monotonic time past which the node does
        #: without it; `heir_failed`: it will never have one (it failed to
        #: start, or it left), the node owns what the workers submit.
        self.heir_deadline = 0.0
        self.heir_failed = False
        #: Once its driver left: an heir may start, on the first submission of
        #: the job's workers (a job whose detached actors submit nothing never
        #: has one); until then, the refs its workers take (`pending`, object id
        #: -> count), told to the heir before that submission.
        self.may_heir = False
        self.pending: collections.Counter = collections.Counter()
        #: For an heir's own link: the kept job it is the heir of.
        self.heir_of: DriverLink | None = None
        #: Its actors here that a detached actor of its job created: actor id
        #: -> (that owner's id, its token); kept when the driver leaves, until
        #: their owner is dead (see DriverOwner.driver_left).
        self.owned_actors: dict[bytes, tuple[bytes, bytes]] = {}

    # -- JobOwner, for this job's workers ------------------------------------------
    def job_config(self) -> dict:
        return dict(self.config)

    def accept(self, spec, actor_id: bytes | None = None) -> None:
        if actor_id is not None and spec.kind == ACTOR_CREATION and actor_id in self.detached \
                and not self.left and not spec.actor_options.get("detached"):
            # (Ray: an actor's owner is the worker that created it, so one a
            # detached actor creates dies with it, not with this driver.)
            spec.actor_options = {**spec.actor_options, OWNER_KEY: actor_id}
        self.owner.accept(spec, self)

    def fetch(self, object_ids) -> None:
        self.owner.fetch(object_ids, self)

    def pin(self, object_ids) -> None:
        self.owner.pin(object_ids, self)

    def unpin(self, object_ids) -> None:
        self.owner.unpin(object_ids, self)

    def cancel_elsewhere(self, object_ids: list, force: bool) -> None:
        """A worker of this job cancelled tasks this node does not run (or
        their children): the driver that placed them cancels them where they
        run (``CancelChildren``; its heir once it left)."""
        link = self.heir if self.left else self
        if link is not None:
            link.send(P.CancelChildren(object_ids, force))

    def send(self, message) -> None:
        if self.left:
            return
        try:
            self.send_now(message)
        except exc.BackendError:
            pass  # it left; its Left event cleans up

    def send_now(self, message) -> None:
        """Send `message` after the queued results; BackendError if the driver left."""
        if self.left:
            raise exc.BackendError("the driver of this job left")
        if self.results or self.events:
            self.flush()
        self.conn.send(message)

    def flush(self) -> None:
        """Send the queued events and results (BackendError if the driver left).
        A batch too large for one message goes as its events, then each result
        alone: one too large for a message goes as an error that says so."""
        with self.results_lock:
            results, self.results, self.results_bytes = self.results, [], 0
            events = self.events
            if events:
                self.events = []
            elif not results:
                return
            try:
                if events:
                    self.conn.send(P.Report(events, [(i, P.wire(sobj)) for i, sobj in results]))
                elif len(results) == 1:
                    P.send_object(self.conn, *results[0])
                else:
                    self.conn.send(P.Objects([(i, P.wire(sobj)) for i, sobj in results]))
                return
            except ProtocolError:  # (too large: nothing was sent)
                pass
            if events:
                self.conn.send(P.Report(events, []))
            for object_id, sobj in results:
                P.send_object(self.conn, object_id, sobj)


class _Stream:
    """A streaming generator call this node runs for a driver: each item is
    sent to the driver as soon as it is stored here, in order (`follow`)."""

    __slots__ = ("link", "stream_id", "index", "waiter", "lock", "busy", "again", "done",
                 "prefixes", "signals")

    def __init__(self, link: DriverLink, stream_id: bytes, index: int):
        self.link = link
        self.stream_id = stream_id
        self.index = index  # the next item to send
        self.waiter = None  # the store's waiter for that item
        self.lock = threading.Lock()
        self.busy = False  # a thread is sending items (see DriverOwner._follow)
        self.again = False  # an item arrived meanwhile: that thread looks again
        self.done = False
        #: The id prefixes of the consumer's acknowledgements and closed mark
        #: (``core/generators.py``), which the producer waits for here, and
        #: the ones of them stored here (freed when the stream ends).
        self.prefixes = (ack_id(stream_id, 0)[:-8], closed_id(stream_id)[:-8])
        self.signals: list[bytes] = []


class DriverOwner:
    """The job owner of a daemon's Node: the drivers connected to the node."""

    def __init__(self):
        self.node = None  # set once the Node is made
        self.refs = ReferenceCounter(self._released)
        self.lock = threading.Lock()
        self.drivers: dict = {}  # connection -> DriverLink
        #: object id -> the driver it is asked of (or pulled for), until it is here
        self._fetching: dict[bytes, DriverLink] = {}
        self.puller: Puller | None = None  # set with the node (see attach)
        #: (add?, object id): changes to what this node holds, to record in the
        #: control store (``record_locations``).
        self.locations: collections.deque = collections.deque()
        #: task id -> the driver whose task it is, until its last attempt ends;
        #: actor id -> the driver whose actor it is, until it is dead (whom
        #: the node's observer hooks are reported to).
        self.task_driver: dict[bytes, DriverLink] = {}
        self.actor_driver: dict[bytes, DriverLink] = {}
        #: task id -> the driver that sent it, until its results are out (its
        #: job, for the node's scheduler: `job_of`).
        self.task_job: dict[bytes, DriverLink] = {}
        #: (driver, object id) -> refs to it the workers of that driver's job
        #: hold (it is told when one is first held here, and when none is any
        #: more: ``Borrow``).
        self.borrowed: collections.Counter = collections.Counter()
        #: The thread in a turn of the node's loop (results wait for its end),
        #: and the links with results queued meanwhile.
        self._deferring = 0
        self._deferred: set = set()
        #: Links with events queued outside a turn (see flush_events).
        self._idle_events: set = set()
        #: time.time() - time.perf_counter(): progress times as epoch times.
        self._clock = time.time() - time.perf_counter()
        #: Streaming generator calls running here: stream id -> its _Stream;
        #: the id prefixes of their consumers' signals -> the _Stream; those of
        #: streams that ended (see _store).
        self.streams: dict[bytes, _Stream] = {}
        self._signals: dict[bytes, _Stream] = {}
        self._ended_signals: collections.OrderedDict = collections.OrderedDict()
        #: task id -> (its driver, [results left], its dependencies): a task or
        #: call whose small results go straight to its driver (`_deliver`).
        self._direct: dict[bytes, tuple] = {}
        self._observing = False  # (see _observe_task_ends)
        #: task id -> the job (driver) of the actor, for a call of an actor of
        #: another driver's job, until its results are out (see `_lend`).
        self._call_job: dict[bytes, DriverLink] = {}
        #: The results of the tasks this node owns (see `adopt`), until made.
        self._adopted: set[bytes] = set()
        #: Where heirs join the cluster (the head's address; None: no heirs)
        #: and with what key (set by the daemon); the heirs starting (their
        #: nonce -> the job they are the heir of), and the Runtime of each
        #: heir that started, by job (see `_start_heir`). An heir joins once
        #: both its DriverHello was read here and its Runtime is made, in
        #: either order (see `_heir_ready`): until then, its link by nonce
        #: (hello read) or its nonce (Runtime made).
        self.heir_address: str | None = None
        self.secret = b""
        self._heirs: dict[str, DriverLink] = {}
        self._heir_hellos: dict[str, DriverLink] = {}
        self._heirs_made: set[str] = set()
        self._heir_runtimes: dict[DriverLink, object] = {}
        self._closing = False  # (close() began: an heir that starts now is ended)
        #: What other threads hand to the daemon's loop (run by flush_events).
        self._loop_calls: collections.deque = collections.deque()
        #: Results of nested tasks a job with detached actors here submitted,
        #: asked of its driver as soon as they are made (see `accept`) and not
        #: waited for by a worker here: stored only while a ref to them is held.
        self._eager: set[bytes] = set()
        #: actor id -> [(until when, driver, RunTask fields)]: calls of an actor
        #: whose creation has not reached this node yet (see `_run`).
        self._early_calls: dict[bytes, list] = {}
        #: Actors kept for their owner (a detached actor, maybe on another
        #: node) after their job's driver left: actor id -> (owner id, token),
        #: until the owner is dead (`check_owners`) or they are.
        self._kept_actors: dict[bytes, tuple[bytes, bytes]] = {}
        self._owners_checked = 0.0
        #: Direct channels (``direct.py``) this node asked a worker to open:
        #: token -> (driver, worker, actor id); and the calls of lost ones
        #: waiting for the node to see their worker die: (driver, actor id) ->
        #: [until when, worker, [lost specs], [(spec, objects, locations)]
        #: of that driver's later calls of the actor].
        self._channels: dict[bytes, tuple] = {}
        self._lost: dict[tuple, list] = {}
        #: Results of a detached actor's nested tasks made on other nodes whose
        #: driver left before sending them here (see `driver_left`): object id
        #: -> how many nodes have yet to answer its ``Claim`` (0 until sent);
        #: the ones to claim (sent by the daemon's location writer,
        #: `send_claims`). And on the node that makes one: object id -> the
        #: claimant's connection, until it is served (see `_claim`).
        self._claimed: dict[bytes, int] = {}
        self._to_claim: list[bytes] = []
        self._claims: dict[bytes, object] = {}
        #: The tasks here a detached actor submitted (`CLAIMABLE_KEY`), until
        #: their results are out; those of their results made once the driver
        #: was gone: object id -> until when it is kept for a claim.
        self._claimable: set[bytes] = set()
        self._unclaimed: dict[bytes, float] = {}
        #: The eager results' tasks (plain ones): return id -> (spec, its job),
        #: to submit again if no node makes it once claimed (see
        #: `_claims_lost`); pruned of what is over past `_specs_limit` entries.
        self._eager_specs: dict[bytes, tuple] = {}
        self._specs_limit = 1024

    def attach(self, node, transport) -> None:
        """The daemon made its Node: pulls from other nodes go over `transport`."""
        self.node = node
        node.scheduler.job_of = self.job_of
        node.scheduler.deliver = self._deliver
        node.scheduler.lending = self._lending
        self.puller = Puller(transport, node.object_store, self._pulled, self._pull_failed)
        node.object_store.on_lost = self._owner_died
        plugins.add_listener("beamlet_actor_state", self._actor_state)

    def job_of(self, spec) -> DriverLink | None:
        """The node scheduler's hook: the job (driver) of a task or actor it runs."""
        if spec.kind == ACTOR_CREATION:
            return self.actor_driver.get(spec.actor_id)
        return self.task_job.get(spec.task_id)

    # -- refs the node's workers hold (the Node's pin/unpin) ---------------------
    def pin(self, object_ids, link: DriverLink | None = None) -> None:
        """Workers of `link`'s job hold these refs: keep the objects here, and
        have that driver (which owns them) count this node among their holders,
        so that it does not free what only a worker here still holds."""
        self.refs.incr_all(object_ids)
        if link is not None and link.left:
            link = self._successor(link, "borrow", object_ids)
        if link is None or link is _LATER:
            return  # (no job, or its driver left: nobody to tell, or its heir later)
        self._borrow(link, object_ids)

    def _borrow(self, link: DriverLink, object_ids) -> None:
        """Count refs to these that `link`'s job's workers hold; tell its
        driver of the first one to each."""
        added = []
        with self.lock:
            borrowed = self.borrowed
            for object_id in object_ids:
                key = (link, object_id)
                borrowed[key] += 1
                if borrowed[key] == 1:
                    added.append(object_id)
        if added:
            link.send(P.Borrow(added, []))

    def unpin(self, object_ids, link: DriverLink | None = None) -> None:
        if type(object_ids) is not list:
            object_ids = list(object_ids)  # (read twice: a dead worker's are an iterator)
        if link is not None and link.left:
            link = self._successor(link, "unborrow", object_ids)
        if link is not None and link is not _LATER:
            self._unborrow(link, object_ids)
        self.refs.decr_all(object_ids)

    def _unborrow(self, link: DriverLink, object_ids: list) -> None:
        """`link`'s job's workers let go of refs to these; tell its driver of
        the last one to each."""
        released = []
        with self.lock:
            borrowed = self.borrowed
            for object_id in object_ids:
                key = (link, object_id)
                if borrowed[key] <= 1:
                    if borrowed.pop(key, 0):
                        released.append(object_id)
                else:
                    borrowed[key] -= 1
        if released and not link.left:
            link.send(P.Borrow([], released))

    # -- an heir for a job whose driver left (heir.py) ------------------------------
    def _successor(self, link: DriverLink, what: str, argument):
        """Who owns what `link`'s job's workers ask for now that its driver
        left: its heir, None (no heir: this node, see `adopt`), or `_LATER`
        (the heir is joining: kept as ``(what, argument)`` for it). The first
        submission starts the heir (see `DriverLink.may_heir`)."""
        with link.heir_lock:
            if link.waiting is not None:
                link.waiting.append((what, argument))
                return _LATER
            if link.heir is not None or not link.may_heir:
                return link.heir
            if what != "accept":
                # (Nothing the heir owns exists yet: a fetch is of the driver's,
                # lost with it; refs taken now are told to the heir as it joins,
                # since the submitter's refs to a submission's results come
                # before the submission itself.)
                pending = link.pending
                if what == "borrow":
                    pending.update(argument)
                elif what == "unborrow":
                    for object_id in argument:
                        if pending[object_id] > 1:
                            pending[object_id] -= 1
                        else:
                            pending.pop(object_id, None)
                return None
            link.may_heir = False
            held = list(link.pending.elements())
            link.pending.clear()
            link.waiting = ([("borrow", held)] if held else []) + [(what, argument)]
        self._start_heir(link)
        return _LATER

    def _start_heir(self, link: DriverLink) -> None:
        """`link`'s driver left while detached actors of its job live here:
        start its heir (what the workers ask for waits until it joined, or
        until `HEIR_START_WAIT` has passed: see `flush_events`)."""
        if self.heir_address is None:
            return
        from .heir import start_heir
        with link.heir_lock:
            link.heir_deadline = time.monotonic() + HEIR_START_WAIT
        nonce, thread = start_heir(
            self.heir_address, self.secret, link.config,
            lambda runtime: self._heir_started(link, nonce, runtime),
            lambda err: self._loop_calls.append(lambda: self._heir_failed(link, nonce, err)))
        self._heirs[nonce] = link
        thread.start()

    def _heir_started(self, link: DriverLink, nonce: str, runtime) -> None:
        """(The heir's starting thread, once its Runtime is made: not before,
        or what is sent to it would reach a half-made runtime.) Keep its
        runtime to end it with the job, and have the loop hand it what waits
        (`_heir_ready`); end it now if the job is over, the node does without
        it (it failed to join in time, or left) or the daemon is closing."""
        with self.lock:  # (close() sets _closing under it, then ends the heirs kept)
            with link.heir_lock:
                stop = link.ended or link.heir_failed or self._closing
                if not stop:
                    self._heir_runtimes[link] = runtime
        if stop:
            runtime.shutdown()  # (not the loop's thread: it says goodbye to this node)
        else:
            self._loop_calls.append(lambda: self._heir_ready(link, nonce))

    def _heir_ready(self, link: DriverLink, nonce: str) -> None:
        """(The daemon's loop.) The heir's Runtime is made: it owns what
        `link`'s job's workers ask for from now on, once this node has read
        its DriverHello. That hello was sent before the Runtime was made, but
        a slow turn of this loop may not have read it yet: then its reading
        completes the join (`_heir_hello`); `HEIR_START_WAIT` still bounds the
        wait for it."""
        if self._heirs.get(nonce) is not link:
            return  # (given up on: `_heir_failed` ended it)
        heir = self._heir_hellos.pop(nonce, None)
        if heir is None and not link.ended:
            self._heirs_made.add(nonce)
            return
        self._heir_join(link, nonce, heir)

    def _heir_hello(self, heir: DriverLink, nonce) -> None:
        """(The daemon's loop.) The DriverHello of a driver that says it is
        the heir `nonce` was read: it joins if its Runtime is made already
        (see `_heir_ready`); what names no heir starting here is a driver."""
        link = self._heirs.get(nonce) if isinstance(nonce, str) else None
        if link is None:
            return
        if nonce in self._heirs_made:
            self._heir_join(link, nonce, heir)
        else:
            self._heir_hellos[nonce] = heir

    def _heir_join(self, link: DriverLink, nonce: str, heir: DriverLink | None) -> None:
        """(The daemon's loop.) The heir `nonce` of `link`'s job started and
        this node read its hello (`heir`: None only if the job ended): it
        owns what the job's workers ask for."""
        if heir is None or link.ended:
            self._heir_failed(link, nonce, exc.BackendError("the job ended as it started"))
            return
        del self._heirs[nonce]
        self._heirs_made.discard(nonce)
        self._heir_joined(link, heir)

    def _heir_failed(self, link: DriverLink, nonce: str, err: BaseException) -> None:
        """(The daemon's loop.) No heir for `link`'s job: this node owns what
        its workers submit (see `adopt`); an heir that starts later is ended."""
        self._heir_hellos.pop(nonce, None)
        self._heirs_made.discard(nonce)
        if self._heirs.pop(nonce, None) is None:
            return  # (it joined, or was given up on, already)
        with link.heir_lock:
            link.heir_failed = True
        print(f"beamlet node: no heir for a job whose driver left ({err}); this node owns "
              f"what its detached actors submit", file=sys.stderr, flush=True)
        self._stop_heir(link)  # (if it started meanwhile)
        self._heir_joined(link, None)

    def _heir_joined(self, link: DriverLink, heir: DriverLink | None) -> None:
        """`heir` (or None: none will) owns what `link`'s job's workers ask
        for from now on: do what they asked for meanwhile."""
        with link.heir_lock:
            waiting, link.waiting = link.waiting or [], None
            link.heir = heir
        if heir is not None:
            heir.heir_of = link
            print(f"beamlet node: an heir owns what job {link.config.get('job_id')}'s "
                  f"detached actors here submit from now on (its driver left)",
                  file=sys.stderr, flush=True)
        target = heir or link
        for what, argument in waiting:
            try:
                if what == "accept":
                    try:
                        self.accept(argument, target)
                    except Exception as err:  # noqa: BLE001 - the submitter gets it from get()
                        self.node.scheduler.reject(argument, exc.TaskError.from_exception(
                            err, argument.display_name))
                elif what == "fetch":
                    self.fetch(argument, target)
                elif heir is not None:
                    (self._borrow if what == "borrow" else self._unborrow)(heir, argument)
            except exc.BackendError:
                pass  # (the heir left meanwhile)

    def _end_heir(self, link: DriverLink) -> None:
        """`link`'s job is over (its last detached actor here is dead): its heir
        leaves."""
        with link.heir_lock:
            link.ended = True
        self._stop_heir(link)

    def _stop_heir(self, link: DriverLink) -> None:
        """End the heir of `link`'s job if it started (in a thread of its own:
        it says goodbye to this node too, which this loop must answer)."""
        with self.lock:
            runtime = self._heir_runtimes.pop(link, None)
        if runtime is not None:
            threading.Thread(target=runtime.shutdown, name="beamlet-heir-end",
                             daemon=True).start()

    def _heir_left(self, heir: DriverLink) -> None:
        """An heir's connection to this node dropped: this node owns what its
        job's workers submit from now on; the heir is ended (its connections
        to the other nodes with it)."""
        kept = heir.heir_of
        if kept is None:
            return
        with kept.heir_lock:
            if kept.heir is heir:
                kept.heir = None
            kept.heir_failed = True
        self._stop_heir(kept)

    # -- what the node's scheduler tells observers: for the driver's --------------
    def _task_finished(self, spec, status, duration, pid) -> None:
        if status == RETRYING:
            link = self.task_driver.get(spec.task_id)
        else:
            link = self.task_driver.pop(spec.task_id, None)
        if link is not None:  # (before its results: they flush it first)
            self._queue_event(link, P.TaskFinished(spec.task_id, spec.attempt, status, duration,
                                                   pid))

    def _task_progress(self, event) -> None:
        """The node scheduler's ``task_progress``: for the task's driver (which
        records it, if it asked: ``task_events`` in its job settings)."""
        task_id, attempt, state, pid, when = event
        link = self.task_driver.get(task_id)
        if link is not None:
            self._queue_event(link, P.TaskProgress(task_id, attempt, state, pid,
                                                   when + self._clock))

    def _lending(self, spec, lent: bool) -> None:
        """The node scheduler's ``lending``: the driver that placed `spec` hears
        that its CPUs are lent out (or taken back), with its next report."""
        link = self.job_of(spec)
        if link is not None and not link.left:
            self._queue_event(link, P.Lent(spec.task_id, lent))

    def _queue_event(self, link: DriverLink, event) -> None:
        """Queue `event` for `link`'s driver, to go with its next results."""
        with link.results_lock:
            link.events.append(event)
        if self._deferring == threading.get_ident():
            self._deferred.add(link)  # (sent at the end of the loop's turn)
        else:
            self._idle_events.add(link)  # (sent with its next results, or at the tick)

    def flush_events(self) -> None:
        """The daemon's tick: send the events queued without results to go with
        (and fail the calls that waited too long for their actor's creation;
        do without an heir that did not join in time; run what other threads
        handed to the loop: one that fails is logged, and the node goes on)."""
        while self._loop_calls:
            call = self._loop_calls.popleft()
            try:
                call()
            except Exception as err:  # noqa: BLE001 - one failing call must not end the loop
                print(f"beamlet node: error in a call handed to the loop: {err!r}\n"
                      f"{traceback.format_exc()}", file=sys.stderr, flush=True)
        if self._heirs:
            now = time.monotonic()
            for nonce, link in list(self._heirs.items()):
                if link.heir_deadline <= now:
                    self._heir_failed(link, nonce, TimeoutError(
                        f"it did not join within {HEIR_START_WAIT:g} s"))
        if self._early_calls:
            self._expire_early_calls()
        if self._unclaimed:
            self._expire_unclaimed()
        if self._lost:
            self._settle_lost()
        while self._idle_events:
            link = self._idle_events.pop()
            if link.events:
                try:
                    link.flush()
                except exc.BackendError:
                    pass  # it left

    def _actor_state(self, actor_id, class_name, state, reason) -> None:
        if state == "DEAD":
            link = self.actor_driver.pop(actor_id, None)
            if link is not None and link.owned_actors:
                link.owned_actors.pop(actor_id, None)
            if self._kept_actors:
                kept = self._kept_actors.pop(actor_id, None)
                if kept is not None:
                    self.refs.decr(kept[1])
        else:
            link = self.actor_driver.get(actor_id)
        if link is None:
            return
        if not link.left:
            link.send(P.ActorState(actor_id, class_name, str(state), reason))
        elif state == "DEAD" and link not in self.actor_driver.values():
            self.node.scheduler.job_ended(link)  # (its last actor: the job is over)
            self._end_heir(link)

    def _owner_died(self, object_ids, error) -> None:
        """Objects a dead worker put here die with it: in the drivers too."""
        for link in list(self.drivers.values()):
            link.send(P.OwnerDied(list(object_ids), str(error)))

    def _released(self, object_id: bytes) -> None:
        # Only present objects: deleting an absent id would make the store
        # discard its value when it arrives (a later task's argument).
        if self.node is not None and self.node.object_store.contains(object_id):
            self.node.release(object_id)

    # -- JobOwner ----------------------------------------------------------------
    def defer_results(self, deferring: bool) -> None:
        """The node's hook around each turn of its loop: small results stored
        during the turn go to each driver in one message at its end (many calls
        finishing together cost one send, not one each)."""
        if deferring:
            self._deferring = threading.get_ident()
            return
        self._deferring = 0
        while self._deferred:
            link = self._deferred.pop()
            try:
                link.flush()
            except exc.BackendError:
                pass  # it left; its Left event cleans up

    def job_config(self) -> dict:
        """The settings of a worker of no job (the node's own)."""
        return {"job_id": "", "namespace": "", "sys_path": list(sys.path), "cwd": os.getcwd()}

    def accept(self, spec, link: DriverLink | None = None) -> None:
        """A task submitted by a worker of `link`'s job: to that driver (or, if it
        left, to this node: `adopt`)."""
        if link is not None and link.left:
            heir = self._successor(link, "accept", spec)
            if heir is _LATER:
                return
            if heir is None:
                self.adopt(spec, link)
                return
            link = heir
        if link is None or self.drivers.get(link.conn) is not link:
            raise exc.BackendError("the driver of this task's job is not connected to this "
                                   "node to accept the task")
        seen: set = set()
        found = self._held(spec.dependencies(), seen)
        found.extend(self._held(spec.contained_refs(), seen))
        # What a detached actor submits is its own (Ray: the actor owns it),
        # so its results must outlive the driver: a copy comes here as each is
        # made, while the driver is here to send it (and the node making one
        # after the driver left keeps it for this node's claim: `send_claims`).
        eager = bool(link.detached) and spec.kind != ACTOR_CREATION and spec.generator is None
        if eager:
            spec.actor_options = {**(spec.actor_options or {}),
                                  CLAIMABLE_KEY: self.node.node_id}
        link.send_now(P.NestedSubmit(spec, self._ship(link, found)))
        if eager:
            self._eager.update(spec.return_ids)
            if spec.kind == TASK:
                self._keep_spec(spec, link)
            self.fetch(spec.return_ids, link)

    def _keep_spec(self, spec, link: DriverLink) -> None:
        """Keep an eager result's task to submit it again if needed (see
        `_claims_lost`); drop the ones whose results came meanwhile."""
        with self.lock:
            specs = self._eager_specs
            for object_id in spec.return_ids:
                specs[object_id] = (spec, link)
            if len(specs) > self._specs_limit:
                for object_id in [i for i in specs
                                  if i not in self._eager and i not in self._claimed]:
                    del specs[object_id]
                self._specs_limit = max(1024, 2 * len(specs))

    def adopt(self, spec, link: DriverLink) -> None:
        """A task (or actor, or call) a worker of `link`'s job submitted after
        its driver left (a detached actor's): this node owns it, and runs it.
        Its arguments are kept until it ends; its results are stored here,
        held by the refs the node's workers hold (the submitter's first: its
        ``Refs`` come before its ``Submit``), and freed once none is. A
        request this node could never hold, or a call of an actor elsewhere,
        raises ValueError (the submitter's get raises it)."""
        why = " (submitted by a detached actor whose driver left: this node, the actor's, " \
              "runs what it submits)"
        if spec.kind == ACTOR_METHOD and spec.actor_id not in self.node.scheduler.actors:
            raise ValueError(f"{spec.display_name}: the actor is not on this node{why}")
        deps = spec.dependencies()
        deps.extend(spec.contained_refs())
        self.task_job[spec.task_id] = link
        if spec.kind == ACTOR_CREATION:
            self.actor_driver[spec.actor_id] = link
        if deps:
            self.refs.incr_all(deps)
        self._adopted.update(spec.return_ids)

        def done(_first) -> None:
            self._adopted.difference_update(spec.return_ids)
            if self.task_job.get(spec.task_id) is link:
                del self.task_job[spec.task_id]
            if deps:
                self.refs.decr_all(deps)
            for rid in spec.return_ids:
                if not self.refs.count(rid):
                    self._released(rid)  # (its refs went before it came)

        try:
            self.node.scheduler.submit(spec)
        except BaseException as err:
            self._adopted.difference_update(spec.return_ids)
            self.task_job.pop(spec.task_id, None)
            if spec.kind == ACTOR_CREATION:
                self.actor_driver.pop(spec.actor_id, None)
            if deps:
                self.refs.decr_all(deps)
            if isinstance(err, ValueError):
                raise ValueError(f"{err}{why}") from None
            raise
        self.node.object_store.on_ready(spec.return_ids[0], done)
        if self._early_calls and spec.kind == ACTOR_CREATION:
            actor_id = spec.actor_id  # (its waiting calls run on the daemon's loop, as all calls)
            self._loop_calls.append(lambda: self._release_early_calls(actor_id))

    def _lost_with_driver(self, object_ids) -> None:
        """Workers of a job whose driver left wait for these objects, which
        this node lacks: the ones it is not making were the driver's, and are
        lost with it (as in Ray when an object's owner dies)."""
        store = self.node.object_store
        for object_id in object_ids:
            with self.lock:
                if object_id in self._fetching:
                    continue  # (being pulled here)
            if object_id in self._adopted or store.contains(object_id):
                continue  # (being made here)
            store.put(object_id, serialize(exc.OwnerDiedError(
                f"object {object_id.hex()} was owned by a driver that left"), is_error=True))
            if not self.refs.count(object_id):
                self._released(object_id)

    def _held(self, object_ids, seen: set) -> list:
        """``(id, entry)`` of the objects among `object_ids` this node holds, and
        of the ones their values contain (inner ones first), skipping `seen`.
        The driver owns every ref: a value put by a worker here must reach it
        (or where it is must) with the first ref to it that leaves this node."""
        store = self.node.object_store
        out = []
        for object_id in object_ids:
            if object_id in seen:
                continue
            entry = store.entry(object_id)
            if entry is None:
                continue
            seen.add(object_id)
            if entry.refs:
                out.extend(self._held(entry.refs, seen))
            out.append((object_id, entry))
        return out

    def _ship(self, link: DriverLink, found: list) -> list:
        """Tell the driver of `found` (from `_held`): where the large ones are
        (``Located``, sent now; each kept here for it until it lets go), and the
        small ones' values, returned as ``[(id, wire form)]`` for the caller."""
        store = self.node.object_store
        located, values = [], []
        for object_id, entry in found:
            if type(entry) is ShmEntry:
                if not self._hold(link, object_id):
                    continue  # (its driver is gone)
                located.append((object_id, entry.size, entry.is_error, tuple(entry.refs)))
                continue
            try:
                values.append((object_id, P.wire(store.get([object_id], 0)[0])))
            except exc.BeamletError:
                continue  # freed meanwhile
        if located:
            link.send_now(P.Located(located, False))
        return values

    def _hold(self, link: DriverLink, object_id: bytes) -> bool:
        """Keep an object here for `link`'s driver (until it lets go); False if
        that driver is gone."""
        if self.drivers.get(link.conn) is not link:
            return False
        if object_id not in link.held:
            self.refs.incr(object_id)
            link.held.add(object_id)
            self.locations.append((True, object_id))
        return True

    def _let_go(self, link: DriverLink, object_ids) -> None:
        """`link`'s driver let go of these (tokens or held objects)."""
        objects = [i for i in object_ids if i in link.held]
        link.tokens.difference_update(object_ids)
        link.held.difference_update(objects)
        self.locations.extend((False, i) for i in objects)
        self.refs.decr_all(object_ids)

    def check_owners(self, tables) -> None:
        """(The daemon's location writer, off the loop.) Every
        `OWNERS_INTERVAL`: end the actors kept for an owner that is dead (its
        record says so, or is gone, or its node is dead). BackendError if the
        control store is down."""
        now = time.monotonic()
        if not self._kept_actors or now < self._owners_checked + OWNERS_INTERVAL:
            return
        self._owners_checked = now
        dead = set()
        for owner in {o for o, _ in list(self._kept_actors.values())}:
            info = tables.actor(owner)
            if info is None or info.state is ActorState.DEAD:
                dead.add(owner)
            elif info.node_id is not None:
                node = tables.node(info.node_id)
                if node is None or node.state is NodeState.DEAD:
                    dead.add(owner)
        if dead:
            self._loop_calls.append(lambda: self._owners_died(dead))

    def _owners_died(self, owners: set) -> None:
        """(The daemon's loop.) These owners are dead: the actors kept for
        them end (nothing holds their tokens any more)."""
        for actor_id, (owner, token) in list(self._kept_actors.items()):
            if owner in owners and self._kept_actors.pop(actor_id, None) is not None:
                self.refs.decr(token)

    def record_locations(self, tables, node_id: str, limit: int = 200) -> None:
        """Write up to `limit` queued changes to the object locations table.
        BackendError (the control store is down) leaves the rest queued."""
        queue = self.locations
        for _ in range(min(limit, len(queue))):
            add, object_id = queue[0]
            if add:
                tables.add_object_location(object_id, node_id)
            else:
                tables.remove_object_location(object_id, node_id)
            queue.popleft()

    def fetch(self, object_ids, link: DriverLink | None = None) -> None:
        """The node's hook: a worker of `link`'s job waits for objects this node
        lacks; ask that driver for them (it sends each once it has it, or where
        to pull it)."""
        if link is None:
            return
        if link.left:
            # (What a task here makes for the driver that left is stored here
            # once made; what it makes for a driver still here, e.g. the
            # heir's own submissions, goes to that driver, not into the store:
            # asked of the heir as the rest.)
            object_ids = [i for i in object_ids
                          if not self._stored_when_made(i) and i not in self._claimed]
            if not object_ids:
                return
            heir = self._successor(link, "fetch", object_ids)
            if heir is _LATER:
                return
            if heir is None:
                self._lost_with_driver(object_ids)
                return
            link = heir
        with self.lock:
            new = [i for i in dict.fromkeys(object_ids) if i not in self._fetching]
            for object_id in new:
                self._fetching[object_id] = link
        if new:
            link.send(P.Fetch(new))

    def _stored_when_made(self, object_id: bytes) -> bool:
        """Whether a task here makes `object_id` and its result will be stored
        here (its driver left), not just sent to a driver that is here."""
        task_id = self.node.scheduler.maker(object_id)
        if task_id is None:
            return False
        direct = self._direct.get(task_id)
        return direct is None or self.drivers.get(direct[0].conn) is not direct[0]

    # -- a detached actor's nested results made on another node (Claim) ----------
    def send_claims(self, tables, node_id: str) -> None:
        """(The daemon's location writer, off the loop.) Claim the results
        queued by `driver_left` from every other alive node (`node_id` is this
        one's): the node making one sends it here once made (see `_claim`);
        one that no node makes is lost with the driver. BackendError if the
        control store is down (they stay queued)."""
        if not self._to_claim:
            return
        with self.lock:
            object_ids, self._to_claim = self._to_claim, []
        try:
            addresses = [n.address for n in tables.nodes()
                         if n.state is NodeState.ALIVE and n.node_id != node_id]
        except exc.BackendError:
            with self.lock:
                self._to_claim[:0] = object_ids
            raise
        with self.lock:
            object_ids = [i for i in object_ids if i in self._claimed]
            for object_id in object_ids:
                self._claimed[object_id] = len(addresses)
            if not addresses:
                for object_id in object_ids:
                    del self._claimed[object_id]
        if not addresses:
            if object_ids:
                self._loop_calls.append(lambda: self._claims_lost(object_ids))
            return
        for address in addresses:
            self.puller.pull(address, object_ids, claim=True)

    def _claim(self, conn, object_ids) -> None:
        """A peer node claims these: send it each held here now, each being
        made here once it is (kept here until then, then freed unless held for
        another reason), and ``Missing`` for the rest."""
        store = self.node.object_store
        scheduler = self.node.scheduler
        now, later = [], []
        for object_id in object_ids:
            # (Under the scheduler's lock, which a task's end holds from the
            # moment it is no longer `making` its results until they are
            # delivered or stored: a result is either still to be made, and
            # then stored for the claim by `_deliver`, or already here, or
            # gone to its driver without being stored.)
            with scheduler.lock:
                if scheduler.making(object_id):
                    with self.lock:
                        self._claims[object_id] = conn
                    self.refs.incr(object_id)
                    later.append(object_id)
                    continue
            with self.lock:
                kept = self._unclaimed.pop(object_id, None) is not None
                if kept:  # (its ref, `_keep_for_claim`'s, is the claim's now)
                    self._claims[object_id] = conn
            (later if kept else now).append(object_id)  # (now: held here, or Missing)
        if now:
            serve_pull(store, conn, now)
        for object_id in later:
            store.on_ready(object_id, self._claim_ready)

    def _claims_lost(self, object_ids: list) -> None:
        """(The daemon's loop.) No node makes or holds these claimed results:
        their driver left before placing their task (or its node died). As
        Ray's actor owns what it submits, the task is submitted again (to the
        job's heir, or run here: see `accept`) if its ``max_retries`` allow,
        and the workers here ask for its results again; else they are lost
        with the driver (``OwnerDiedError``)."""
        again: dict = {}
        lost = []
        with self.lock:
            for object_id in object_ids:
                kept = self._eager_specs.pop(object_id, None)
                if kept is None or not may_retry(kept[0]):
                    lost.append(object_id)
                else:
                    again.setdefault(kept[0].task_id, kept)
        for spec, link in again.values():
            if link.ended or not self.refs.count(spec.return_ids[0]):
                continue
            spec.attempt += 1
            options = {k: v for k, v in spec.actor_options.items() if k != CLAIMABLE_KEY}
            spec.actor_options = options or None  # (its new owner is here to get it)
            try:
                self.accept(spec, link)
                self.fetch(list(spec.return_ids), link)
            except Exception:  # noqa: BLE001 - then as if it could not be retried
                lost.extend(spec.return_ids)
        if lost:
            self._lost_with_driver(lost)

    def _keep_for_claim(self, object_id: bytes) -> None:
        """A result of a task a detached actor of another node submitted is
        made here: keep it for that node's claim, for `CLAIM_GRACE` seconds at
        most (unless claimed already). Even while the driver is here: it may
        leave before it sends that node the copy it asked for."""
        with self.lock:
            if object_id in self._claims:
                return  # (served by `_claim_ready`)
            self._unclaimed[object_id] = time.monotonic() + CLAIM_GRACE
        self.refs.incr(object_id)

    def _expire_unclaimed(self) -> None:
        """(The daemon's tick.) Free the results kept too long for a claim."""
        now = time.monotonic()
        with self.lock:
            due = [i for i, until in self._unclaimed.items() if until <= now]
            for object_id in due:
                del self._unclaimed[object_id]
        if due:
            self.refs.decr_all(due)

    def _claim_ready(self, object_id: bytes) -> None:
        """A claimed object is stored here: send it to its claimant (as a Pull
        is served), then let go of it."""
        def served() -> None:
            with self.lock:
                self._claims.pop(object_id, None)
            self.refs.decr(object_id)

        with self.lock:
            conn = self._claims.get(object_id)
        if conn is None:
            served()
        else:
            serve_pull(self.node.object_store, conn, [object_id], served)

    def _pull(self, link: DriverLink, locations) -> None:
        """Pull these ``(id, address)`` for `link`'s driver."""
        by_source: dict = {}
        for object_id, address in locations:
            by_source.setdefault(address, []).append(object_id)
        for address, ids in by_source.items():
            with self.lock:
                for object_id in ids:
                    self._fetching[object_id] = link
            self.puller.pull(address, ids)

    def _pulled(self, object_id: bytes, size: int, is_error: bool, refs) -> None:
        """A pulled copy is stored (the puller's thread): keep it for the driver
        it was pulled for until it lets go, and say so (so that it frees every
        copy)."""
        with self.lock:
            link = self._fetching.pop(object_id, None)
            claimed = self._claimed.pop(object_id, None) is not None
        if claimed:  # (kept for the refs the workers here hold: see `driver_left`)
            with self.lock:
                self._eager_specs.pop(object_id, None)
            if not self.refs.count(object_id):
                self._released(object_id)
            return
        self._eager.discard(object_id)
        if link is not None and self._hold(link, object_id):
            link.send(P.Located([(object_id, size, is_error, tuple(refs))], True))
        else:
            self._released(object_id)

    def _pull_failed(self, object_ids) -> None:
        """A node did not have these (freed, or lost with it): ask the driver
        again, a moment later (by then it knows whether that node died)."""
        by_link: dict = {}
        lost = []
        with self.lock:
            for object_id in object_ids:
                left = self._claimed.get(object_id)
                if left is not None:  # (a Claim's answer: lost once no node makes it)
                    if left > 1:
                        self._claimed[object_id] = left - 1
                    else:
                        del self._claimed[object_id]
                        lost.append(object_id)
                    continue
                link = self._fetching.pop(object_id, None)
                if link is not None:
                    by_link.setdefault(link, []).append(object_id)
        if lost:
            self._loop_calls.append(lambda: self._claims_lost(lost))
        for link, ids in by_link.items():
            timer = threading.Timer(REFETCH_DELAY, self.fetch, (ids, link))
            timer.daemon = True
            timer.start()

    # -- messages from drivers (the daemon's loop) --------------------------------
    def on_message(self, conn, message) -> None:
        kind = type(message)
        if kind is P.Pull:  # (from a driver, or from a peer node)
            try:
                serve_pull(self.node.object_store, conn, message.object_ids)
            except exc.BackendError:
                pass  # it left
            return
        if kind is P.Claim:  # (from a peer node: see `_claim`)
            self._claim(conn, message.object_ids)
            return
        link = self.drivers.get(conn)
        if kind is P.RunTask and link is not None:  # (the usual message first)
            if self._lost and message.spec.kind == ACTOR_METHOD \
                    and (link, message.spec.actor_id) in self._lost:
                self._lost[link, message.spec.actor_id][3].append(tuple(message[:3]))
                return  # (behind the calls of its lost channel)
            self._run(link, *message)
            return
        if kind is P.DriverHello:
            if link is None and isinstance(message.job_config, dict):
                link = self.drivers[conn] = DriverLink(self, conn, message.job_config)
                if link.task_events:
                    self._observe_task_ends()
                if self._heirs:
                    self._heir_hello(link, message.job_config.get("heir_of"))
            return
        if link is None:
            raise ValueError(f"{P.describe(message)} before DriverHello")
        if kind is P.RunTask:
            self._run(link, message.spec, message.objects, message.locations)
        elif kind is P.Objects:
            self._store(message.objects)
        elif kind is P.Locations:
            store = self.node.object_store
            here = [i for i, _ in message.locations if store.contains(i)]
            if here:  # (made here: nothing to pull, nor to wait for)
                with self.lock:
                    for object_id in here:
                        self._fetching.pop(object_id, None)
                self._eager.difference_update(here)
            self._pull(link, [(i, a) for i, a in message.locations if i not in here])
        elif kind is P.Release:
            self._let_go(link, [i for i in message.object_ids
                                if i in link.tokens or i in link.held])
        elif kind is P.CancelTask:
            try:
                elsewhere = self.node.scheduler.cancel(message.object_id, message.force,
                                                       message.recursive)
            except ValueError:
                return  # the driver checked what it could; the rest cannot be told
            if elsewhere:
                link.send(P.CancelChildren(elsewhere, message.force))
        elif kind is P.KillActor:
            self.node.scheduler.kill_actor(message.actor_id, message.no_restart)
        elif kind is P.DirectOpen:
            self._direct_open(link, message.actor_id, message.address, message.token)
        elif kind is P.DirectLost:
            self._direct_lost(link, message.token, [TaskSpec(*f) for f in message.specs])
        elif kind is P.CreateGroup:
            self._create_group(link, message.info, message.hosted)
        elif kind is P.RemoveGroup:
            if message.pg_id in link.groups:
                link.groups.discard(message.pg_id)
                self.node.scheduler.remove_placement_group(message.pg_id)

    # -- direct channels (direct.py) ------------------------------------------------
    def _direct_open(self, link: DriverLink, actor_id: bytes, address: str,
                     token: bytes) -> None:
        """A driver asks for a direct channel to an actor alive here: its worker
        connects (if it is not alive here, or no longer, nothing happens: the
        driver's calls stay on this node's path)."""
        from .direct import channel_key, channel_secret
        if type(address) is not str or type(token) is not bytes:
            raise ValueError("a malformed DirectOpen")
        sched = self.node.scheduler
        with sched.lock:
            record = sched.actors.get(actor_id)
            worker = record.worker if record is not None else None
            if worker is None or record.state.name != "ALIVE" or worker.conn is None:
                return
            if len(self._channels) >= 4096:  # (tokens of channels that never opened)
                self._forget_channels()
            self._channels[token] = (link, worker, actor_id)
            key = channel_secret(channel_key(self.secret), token)  # (this channel's only)
            sched._send(worker, LP.DirectConnect(token, address, key))

    def _forget_channels(self) -> None:
        """Drop the channels of workers that died (their drivers were told, or left)."""
        for token, (link, worker, _) in list(self._channels.items()):
            if worker.state == "DEAD" or self.drivers.get(link.conn) is not link:
                self._channels.pop(token, None)

    def direct_done(self, worker, message) -> None:
        """(The node's I/O thread: ``DirectDone``.) A direct call's results go
        through this node's store: to its driver, as this node's own calls'.
        Only a call the driver sent on that channel (its `call_tag`) is taken,
        and only once: a worker cannot finish other calls with it."""
        from .direct import call_tag, channel_key
        sched = self.node.scheduler
        spec = TaskSpec(*message.spec)
        channel = self._channels.get(message.token)
        with sched.lock:
            if channel is None or channel[1] is not worker or \
                    self.drivers.get(channel[0].conn) is not channel[0]:
                return  # (its driver left: nobody wants them; the node drops them)
            task_id = spec.task_id
            if spec.kind != ACTOR_METHOD or spec.actor_id != channel[2] \
                    or type(task_id) is not bytes or len(spec.return_ids) != 1 \
                    or type(spec.return_ids[0]) is not bytes or type(message.tag) is not bytes \
                    or len(message.entries) != 1 or task_id in sched._tasks \
                    or task_id in self.task_job or task_id in self._direct \
                    or not hmac.compare_digest(message.tag, call_tag(
                        channel_key(self.secret), message.token, task_id,
                        spec.return_ids[0])):
                raise ProtocolError("a DirectDone for a call that is not a direct call of "
                                    "its channel's actor")
            link = channel[0]
            self.task_job[spec.task_id] = link
            job = self.actor_driver.get(spec.actor_id)
            if job is not None and job is not link:
                self._call_job[spec.task_id] = job
            self._direct[spec.task_id] = (link, [len(spec.return_ids)], [])
            entries = message.entries
            sched._finish(spec, entries, "FAILED" if entries and entries[0].is_error
                          else "FINISHED", worker)

    def _direct_lost(self, link: DriverLink, token: bytes, specs: list) -> None:
        """A driver's channel closed with `specs` unanswered: once this node has
        seen the channel's worker die (at once if it has), they are answered as
        the calls that worker had in flight (see `_rerun_lost`)."""
        channel = self._channels.pop(token, None)
        if channel is None:
            for spec in specs:  # (not a channel of ours: as calls of a lost worker)
                self._rerun_lost(link, spec, broken=True)
            return
        if not specs:  # (none to answer, none to keep the driver's later calls behind)
            return
        _, worker, actor_id = channel
        key = (link, actor_id)
        if key in self._lost:  # (an older channel's calls are still waiting)
            self._lost[key][2].extend(specs)
            return
        self._lost[key] = [time.monotonic() + LOST_WAIT, worker, specs, []]
        self._settle_lost()

    def _settle_lost(self) -> None:
        """(Each DirectLost, and the daemon's tick.) The lost channels whose
        worker died (or that waited `LOST_WAIT`): their calls, then the calls
        that waited behind them."""
        now = time.monotonic()
        sched = self.node.scheduler
        for key, (until, worker, specs, later) in list(self._lost.items()):
            with sched.lock:
                dead = worker.state == "DEAD"
            if not dead and now < until:
                continue
            del self._lost[key]
            link = key[0]
            if self.drivers.get(link.conn) is not link:
                continue  # (the driver left)
            for spec in specs:
                self._rerun_lost(link, spec, broken=not dead)
            for call in later:
                self._run(link, *call)

    def _rerun_lost(self, link: DriverLink, spec, broken: bool) -> None:
        """A call lost with its direct channel: as a call in flight on a worker
        that died (``_actor_worker_died``): again on the restarted actor if
        retries are left (``max_task_retries``), else ActorUnavailableError;
        ActorDiedError if the actor is dead; ActorUnavailableError if the
        channel broke with its worker alive (`broken`: it may have run)."""
        record = self.node.scheduler.actors.get(spec.actor_id)
        name = spec.function_name.rsplit(".", 1)[0]
        error = None
        if broken:
            error = exc.ActorUnavailableError(
                f"the direct channel to actor {name} broke during this call; the call may "
                f"or may not have run")
        elif record is not None and record.state.name != "DEAD":
            if may_retry(spec, record.spec):
                spec.attempt += 1
            else:
                error = exc.ActorUnavailableError(
                    f"the actor {name} died during this call and is restarting; the call "
                    f"may or may not have run")
        self._run(link, spec, [], [], waited=True, error=error)

    def _create_group(self, link: DriverLink, info, hosted) -> None:
        """Reserve the bundles of a driver's placement group placed here; tell
        it (a result under the node's ready id) once they are. Again for a
        group with bundles here: more of its bundles (placed again after
        another node died), answered under the new ready id."""
        if not isinstance(hosted, list) or not hosted:
            return
        store = self.node.object_store
        store.on_ready(info.ready_id, lambda object_id: self._send_result(link, object_id))
        more = info.pg_id in link.groups
        link.groups.add(info.pg_id)
        try:
            self.node.scheduler.create_placement_group(info, hosted)
        except ValueError as err:  # (the driver saw it fit: the node disagrees)
            if not more:
                link.groups.discard(info.pg_id)
            store.put(info.ready_id, serialize(err, is_error=True))

    def _store(self, objects) -> None:
        store = self.node.object_store
        for object_id, form in objects:
            with self.lock:
                self._fetching.pop(object_id, None)
            eager = bool(self._eager) and object_id in self._eager
            if eager:
                self._eager.discard(object_id)
                if not self.refs.count(object_id):
                    continue  # (nobody here holds it any more)
            if self._signals or self._ended_signals:
                prefix = object_id[:-8]
                if prefix in self._ended_signals:
                    continue  # (a consumer's signal to a stream that ended)
                stream = self._signals.get(prefix)
                if stream is not None:
                    stream.signals.append(object_id)
            if not store.contains(object_id):
                store.put(object_id, P.unwire(form))
                if eager and not self.refs.count(object_id):
                    # (its last ref went between the count above and the put:
                    # its release found nothing to free)
                    self._released(object_id)

    def _run(self, link: DriverLink, spec, objects, locations, waited: bool = False,
             error: BaseException | None = None) -> None:
        if spec.kind == ACTOR_METHOD and not waited \
                and spec.actor_id not in self.node.scheduler.actors:
            # Another driver's (or an heir's) creation of it may still be on
            # its way here, on another connection: the call waits for it.
            self._early_calls.setdefault(spec.actor_id, []).append(
                (time.monotonic() + EARLY_CALL_WAIT, link, spec, objects, locations))
            return
        store = self.node.object_store
        deps = list(dict.fromkeys(spec.dependencies())) if spec.args or spec.kwargs else []
        if deps:
            self.refs.incr_all(deps)  # until its results are out
            if objects:
                self._store(objects)
            located = {i: a for i, a in locations if not store.contains(i)}
            if located:
                self._pull(link, located.items())
            missing = [d for d in deps if d not in located and not store.contains(d)]
            if missing:
                self.fetch(missing, link)
        self.task_job[spec.task_id] = link
        if link.task_events:
            self.task_driver[spec.task_id] = link
        if spec.kind == ACTOR_CREATION:
            self.actor_driver[spec.actor_id] = link
            if spec.actor_options.get("detached"):
                link.detached.add(spec.actor_id)
            elif spec.actor_options.get(OWNER_KEY) and link.heir_of is None:
                link.owned_actors[spec.actor_id] = (spec.actor_options[OWNER_KEY],
                                                    spec.return_ids[0])
            token = spec.return_ids[0]
            self.refs.incr(token)  # until the driver lets go of the actor
            link.tokens.add(token)
        elif spec.kind == ACTOR_METHOD:
            job = self.actor_driver.get(spec.actor_id)
            if job is not None and job is not link:
                self._call_job[spec.task_id] = job
        left = [len(spec.return_ids)]
        if spec.kind != ACTOR_CREATION and spec.generator is None:
            self._direct[spec.task_id] = (link, left, deps)  # (see _deliver)
            options = spec.actor_options
            if options is not None and options.get(CLAIMABLE_KEY, self.node.node_id) \
                    != self.node.node_id:
                self._claimable.add(spec.task_id)
        else:
            for rid in spec.return_ids:
                store.on_ready(rid, lambda object_id: self._result(link, object_id, left,
                                                                   deps, spec.task_id))
        if spec.generator is not None and spec.generator[0] == "streaming":
            self._stream_started(link, spec)
        if error is not None:  # (a lost direct call that fails: see _rerun_lost)
            self.node.scheduler.reject(spec, error)
            return
        try:
            self.node.scheduler.submit(spec)
        except Exception as err:  # noqa: BLE001 - its results say why
            self.node.scheduler.reject(spec, exc.TaskError.from_exception(err,
                                                                         spec.display_name))
        if self._early_calls and spec.kind == ACTOR_CREATION:
            self._release_early_calls(spec.actor_id)

    def _release_early_calls(self, actor_id: bytes) -> None:
        """The actor's creation reached this node (from a driver, an heir, or
        adopted): the calls that waited for it run."""
        for _, caller, call, objects, locations in self._early_calls.pop(actor_id, ()):
            self._run_call(caller, call, objects, locations)

    def _run_call(self, link: DriverLink, spec, objects, locations) -> None:
        """Run a call that waited for its actor's creation (the node's
        scheduler fails it if that never came), unless its driver left."""
        if self.drivers.get(link.conn) is link:
            self._run(link, spec, objects, locations, waited=True)

    def _expire_early_calls(self) -> None:
        """(The daemon's tick.) Calls that waited too long for their actor fail."""
        now = time.monotonic()
        for actor_id, calls in list(self._early_calls.items()):
            due = [c for c in calls if c[0] <= now]
            if not due:
                continue
            kept = [c for c in calls if c[0] > now]  # (each call waits its own while)
            if kept:
                self._early_calls[actor_id] = kept
            else:
                del self._early_calls[actor_id]
            for _, caller, call, objects, locations in due:
                self._run_call(caller, call, objects, locations)

    def _deliver(self, spec, object_id: bytes, entry) -> bool:
        """The node scheduler's hook (``LocalScheduler.deliver``): a result of a
        task or call a driver sent (not an actor's creation, not a generator's).
        A small one holding no refs goes to the driver as it comes, never
        stored here (a task or worker here that waits for it later asks the
        driver for it, ``Fetch``); any other is
        stored, then sent as `_result` sends it; so is one this node asked the
        driver for meanwhile (a worker or task here waits for it: `fetch`).
        Whether it took `entry`."""
        direct = self._direct.get(spec.task_id)
        if direct is None:
            return False
        link, left, deps = direct
        if type(entry) is ShmEntry or entry.refs or object_id in self._fetching \
                or (self._eager and object_id in self._eager) \
                or (self._claims and object_id in self._claims) \
                or (self._claimable and spec.task_id in self._claimable):
            self.node.object_store.on_ready(
                object_id, lambda object_id: self._result(link, object_id, left, deps,
                                                          spec.task_id))
            return False
        try:
            self._send_small(link, object_id, entry)
        except exc.BackendError:
            pass  # it left
        self._result_out(link, left, deps, spec.task_id)
        return True

    def _send_small(self, link: DriverLink, object_id: bytes, entry) -> None:
        """Send an object held inline to `link`'s driver: into this turn's
        batch while the node defers results (see defer_results), else at once
        (behind what was batched). BackendError if the driver left."""
        if self._deferring == threading.get_ident():
            with link.results_lock:
                link.results.append((object_id, entry))
                link.results_bytes += entry.total_bytes
                full = link.results_bytes >= RESULTS_BATCH_BYTES
            self._deferred.add(link)
            if full:
                link.flush()
        else:
            link.flush()
            P.send_object(link.conn, object_id, entry)

    def _result_out(self, link: DriverLink, left: list, deps: list, task_id: bytes) -> None:
        """One more result of the task is out: once all are, its arguments may go."""
        left[0] -= 1
        if not left[0]:
            self._direct.pop(task_id, None)
            if self._claimable:
                self._claimable.discard(task_id)
            if self._call_job:
                self._call_job.pop(task_id, None)
            if self.task_job.get(task_id) is link:
                self.task_job.pop(task_id, None)
            if deps:
                self.refs.decr_all(deps)

    def _result(self, link: DriverLink, object_id: bytes, left: list, deps: list,
                task_id: bytes) -> None:
        """A result is stored here: send it to its driver (or, if large, where it
        is); free our copy of a small one. (One that a detached actor's node
        may claim is kept for that claim a while: see `_keep_for_claim`.)"""
        if self._claimable and task_id in self._claimable:
            self._keep_for_claim(object_id)
            if self.drivers.get(link.conn) is link:
                self._send_result(link, object_id, self._call_job.get(task_id))
        else:
            self._send_result(link, object_id, self._call_job.get(task_id))
        self._result_out(link, left, deps, task_id)
        if not left[0] and self.streams:
            self._stream_ended(object_id)

    def _send_result(self, link: DriverLink, object_id: bytes,
                     job: DriverLink | None = None) -> None:
        """Send a stored object to `link`'s driver (or, if large, where it is,
        kept here for it); free our copy of a small one. `job`: the driver
        whose actor made it, if not `link`'s (see `_lend`)."""
        store = self.node.object_store
        entry = store.entry(object_id)
        try:
            if entry is None:
                sobj = serialize(exc.ObjectLostError("the result was lost on its node"),
                                 is_error=True)
                link.flush()
                P.send_object(link.conn, object_id, sobj)
            else:
                if entry.refs:  # (inner ones first: the driver must hold them when it sees the result)
                    values = self._ship(link, self._held(entry.refs, {object_id}))
                    if values:
                        link.send_now(P.Objects(values))
                    if job is not None:
                        self._lend(link, job, [i for i in entry.refs
                                               if not store.contains(i)])
                if type(entry) is ShmEntry:
                    self._ship(link, [(object_id, entry)])
                else:
                    self._send_small(link, object_id, entry)
        except exc.BackendError:
            pass  # it left
        eager = bool(self._eager) and object_id in self._eager
        if eager and object_id not in self._fetching:
            self._eager.discard(object_id)  # (no copy is coming for it any more: see `_store`)
        if eager and self.refs.count(object_id):
            pass  # (kept for a worker here)
        elif (self._claims and object_id in self._claims) \
                or (self._unclaimed and object_id in self._unclaimed):
            pass  # (kept for a claim, or freed once served to it: `_claim`)
        elif object_id not in link.held:
            self._released(object_id)  # (not kept for its driver, nor for a worker here)

    def _lend(self, link: DriverLink, job: DriverLink, object_ids: list) -> None:
        """A call by `link`'s driver of an actor of `job`'s returned refs to
        these objects, which `job`'s driver owns and this node lacks: fetch
        them from it, and ship each to `link`'s driver as it comes (as a
        result's inner objects held here are), so that the caller holds a copy
        of its own (if `job`'s driver left, each is an ``OwnerDiedError``)."""
        if not object_ids:
            return
        store = self.node.object_store

        def arrived(object_id: bytes) -> None:
            try:
                values = self._ship(link, self._held([object_id], set()))
                if values:
                    link.send_now(P.Objects(values))
            except exc.BackendError:
                pass  # it left
            if not self.refs.count(object_id):
                self._released(object_id)  # (a small copy nobody here holds)

        for object_id in object_ids:
            store.on_ready(object_id, arrived)
        self.fetch(object_ids, job)

    # -- streaming generator calls: items to the driver as they are made ---------
    def _stream_started(self, link: DriverLink, spec) -> None:
        """Before the call runs: send its items to `link`'s driver as they come
        (from the first its earlier attempts did not deliver)."""
        stream_id = spec.return_ids[0]
        if stream_id in self.streams:
            return
        skip = spec.generator[2] if len(spec.generator) > 2 else 0
        stream = self.streams[stream_id] = _Stream(link, stream_id, skip)
        for prefix in stream.prefixes:
            self._signals[prefix] = stream
        self._follow(stream)

    def _follow(self, stream: _Stream) -> None:
        """Send the stream's items stored here, in order, up to the first that
        is not (then wait for that one); the end-of-stream marker ends it.
        One thread at a time sends: one called meanwhile has the sender look
        again (so the items' order is the order they reach the driver in)."""
        with stream.lock:
            if stream.busy:
                stream.again = True
                return
            stream.busy = True
        store = self.node.object_store
        try:
            while True:
                while not stream.done:
                    object_id = item_id(stream.stream_id, stream.index)
                    if store.contains(object_id):
                        end = _is_end(store, object_id)
                        stream.index += 1
                        self._send_result(stream.link, object_id)
                        if end:
                            self._stream_done(stream)
                        continue
                    stream.waiter = store.notify_when([object_id], 1,
                                                      lambda: self._follow(stream), broad=False)
                    if stream.waiter is None and not store.contains(object_id):
                        self._stream_done(stream)  # (the store closed, or it was let go of)
                    if stream.waiter is not None:
                        break
                with stream.lock:
                    if not stream.again:
                        stream.busy = False
                        return
                    stream.again = False
        except BaseException:
            with stream.lock:
                stream.busy = False
            raise

    def _stream_ended(self, stream_id: bytes) -> None:
        """The call's own result is out (after its items, or it failed before
        its end): nothing more to send."""
        stream = self.streams.get(stream_id)
        if stream is not None:
            self._stream_done(stream)

    def _stream_done(self, stream: _Stream) -> None:
        """Stop following the stream; free its consumer's signals stored here
        (and drop the ones that come late)."""
        stream.done = True
        self.node.object_store.cancel_waiter(stream.waiter)
        if self.streams.get(stream.stream_id) is stream:
            del self.streams[stream.stream_id]
        ended = self._ended_signals
        for prefix in stream.prefixes:
            self._signals.pop(prefix, None)
            ended[prefix] = None
        while len(ended) > ENDED_STREAMS_KEPT:
            ended.popitem(last=False)
        with self.lock:
            for object_id in [i for i in self._fetching if i[:-8] in stream.prefixes]:
                del self._fetching[object_id]
        for object_id in stream.signals:
            self._released(object_id)
        stream.signals = []

    def _observe_task_ends(self) -> None:
        """Listen to the node scheduler's task ends (for `_task_finished`) and
        progress (`_task_progress`) while a connected driver wants them, only
        then: a listener costs every call, the progress hook a tuple a step."""
        wanted = any(link.task_events for link in list(self.drivers.values()))
        if wanted and not self._observing:
            plugins.add_listener("beamlet_task_finished", self._task_finished)
        elif self._observing and not wanted:
            plugins.remove_listener("beamlet_task_finished", self._task_finished)
        scheduler = self.node.scheduler
        with scheduler.lock:  # (its callers test the hook, then call it, under the lock)
            scheduler.task_progress = self._task_progress if wanted else None
        self._observing = wanted

    def driver_left(self, conn) -> None:
        """A driver is gone: let go of its actors (its detached ones live on,
        and its job with them: see `adopt`) and of what was kept for it."""
        link = self.drivers.pop(conn, None)
        if link is None:
            return
        for key in [k for k in self._lost if k[0] is link]:
            del self._lost[key]
        for token in [t for t, c in self._channels.items() if c[0] is link]:
            del self._channels[token]
        if link.task_events:
            self._observe_task_ends()
        if link.heir_of is not None:
            self._heir_left(link)
        for nonce in [n for n, heir in self._heir_hellos.items() if heir is link]:
            self._heir_failed(self._heirs[nonce], nonce, exc.BackendError(
                "its connection to this node dropped as it started"))
        actor_driver = self.actor_driver
        living = {a for a in link.detached if actor_driver.get(a) is link}
        owned = {a: v for a, v in link.owned_actors.items() if actor_driver.get(a) is link}
        living.update(owned)
        link.left = bool(living)
        if link.left and self.heir_address is not None:
            link.may_heir = True  # (started by the job's next submission: see `_successor`)
        for task_id in [k for k, v in self.task_driver.items() if v is link]:
            self.task_driver.pop(task_id, None)
        for actor_id in [k for k, v in actor_driver.items() if v is link and k not in living]:
            actor_driver.pop(actor_id, None)
        with self.lock:
            for key in [k for k in self.borrowed if k[0] is link]:
                del self.borrowed[key]  # (its workers' refs: counted here only, now)
        self._idle_events.discard(link)
        self._deferred.discard(link)
        with self.lock:
            asked = [i for i, v in self._fetching.items() if v is link]
            for object_id in asked:
                self._fetching.pop(object_id, None)
        making = self.node.scheduler.making
        # (What its job's workers asked of it that a task here makes stays
        # theirs: stored here as it is made, see `_deliver`.)
        if link.left and self._eager:
            # What its detached actors submitted that runs on another node is
            # theirs too (Ray: the actor owns it): claimed from the node that
            # makes it (`send_claims`), if a worker here holds a ref to it.
            claimed = [i for i in asked if i in self._eager and not making(i)
                       and self.refs.count(i)]
            if claimed:
                with self.lock:
                    for object_id in claimed:
                        self._claimed[object_id] = 0
                    self._to_claim.extend(claimed)
                claimed = set(claimed)
                self._eager.difference_update(claimed)
                asked = [i for i in asked if i not in claimed]
        self._eager.difference_update(i for i in asked if not making(i))
        asked = [i for i in asked if not making(i)]
        for stream in [s for s in self.streams.values() if s.link is link]:
            self._stream_done(stream)
        for pg_id in list(link.groups):
            self.node.scheduler.remove_placement_group(pg_id)
        link.groups.clear()
        if not link.left:
            self.node.scheduler.job_ended(link)
        if owned:  # (their tokens stay counted until their owner is dead)
            self._kept_actors.update(owned)
            link.tokens.difference_update(token for _, token in owned.values())
        self._let_go(link, list(link.tokens) + list(link.held))
        if link.left:
            asked = [i for i in asked if self.refs.count(i)]
            if asked:
                # Its workers may wait for what it was sending as it left (asked
                # of it, or being pulled): whatever never comes is lost with it.
                self.fetch(asked, link)

    def close(self) -> None:
        with self.lock:  # (an heir still starting is ended as it starts: _heir_started)
            self._closing = True
            runtimes = list(self._heir_runtimes.values())
            self._heir_runtimes.clear()
        for runtime in runtimes:
            runtime.shutdown()
        plugins.remove_listener("beamlet_task_finished", self._task_finished)
        plugins.remove_listener("beamlet_actor_state", self._actor_state)
        if self.puller is not None:
            self.puller.close()
