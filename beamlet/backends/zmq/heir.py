"""A node's heir driver: the owner of what a detached actor submits once the
driver that created it has left.

In Ray an actor owns what it submits: its nested tasks are placed anywhere
in the cluster, and it may call actors on any node. Here a driver owns what
its job's workers submit (``jobs.py``); when it has left while a detached
actor of its job lives on a node, that node starts an heir on the first
submission of the job's workers there (`DriverOwner._successor`): a driver of
its own, in the node daemon's process (`start_heir`), which joins the
cluster as any driver does (the head, every node, the control store) with
the job's settings (its id, namespace, sys.path, cwd, runtime_env). Once
its Runtime is made, the job's workers on that node send it their submissions, fetches
and held refs, as they sent them to the creator (``DriverLink.heir``): it
places their tasks and actors on any node (spillback, resources, placement
groups, calls of actors elsewhere), owns their results, and frees them once
no ref to them is held. It leaves (and its non-detached actors end) when
the job's last detached actor on that node is dead.

What the heir does not know was its predecessor's: a worker waiting for
such an object gets ``OwnerDiedError`` (`HeirScheduler.fetch`), never a
hang.
"""
from __future__ import annotations

import secrets
import threading

from ... import exceptions as exc
from ...core.generators import ack_id, closed_id, stream_prefix
from ...core.serialization import serialize
from ...core.tables import ActorState
from . import protocol as P
from .backend import ClusterBackend, ClusterScheduler

#: The job settings a driver sends in its DriverHello that an heir keeps
#: (see ClusterBackend.job_config); ``heir_of`` names the kept job it is
#: the heir of, on the node that started it.
HEIR_KEY = "heir_of"


class HeirScheduler(ClusterScheduler):
    """The heir's scheduler: a driver's, except that observers are not told
    (they are the node's, in this process: see DriverOwner) and that a fetch
    of an object it does not own is answered with its loss at once (the
    predecessor owned it; a driver would wait for it to be made)."""

    def __init__(self, backend, nodes):
        super().__init__(backend, nodes)
        self.owned: set[bytes] = set()  # returns of the submissions it accepted
        #: The id prefixes of their streams' items and consumer signals, while
        #: each stream runs (then its items are held here, or freed), and the
        #: prefixes of each stream by its id (to drop them when it is over).
        self.owned_prefixes: set[bytes] = set()
        self.stream_prefixes: dict[bytes, tuple] = {}

    def submit(self, spec) -> None:
        self._submit(spec)

    def nested(self, spec, objects: list) -> None:
        with self.lock:
            self.owned.update(spec.return_ids)
            if spec.generator is not None:
                stream_id = spec.return_ids[0]
                prefixes = (stream_prefix(stream_id), ack_id(stream_id, 0)[:-8],
                            closed_id(stream_id)[:-8])
                self.stream_prefixes[stream_id] = prefixes
                self.owned_prefixes.update(prefixes)
        super().nested(spec, objects)

    def _stream_over(self, spec) -> None:
        self._forget_stream(spec)
        super()._stream_over(spec)

    def _fail(self, spec, error: BaseException) -> None:
        if spec.generator is not None:
            self._forget_stream(spec)
        super()._fail(spec, error)

    def _forget_stream(self, spec) -> None:
        """The generator call is over: its items are here (or freed), and its
        producer waits for no signal any more."""
        prefixes = self.stream_prefixes.pop(spec.return_ids[0], None)
        if prefixes is not None:
            self.owned_prefixes.difference_update(prefixes)

    def released(self, object_id: bytes) -> None:
        self.owned.discard(object_id)
        super().released(object_id)

    def _ours(self, object_id: bytes) -> bool:
        return (object_id in self.owned or object_id in self.producer
                or object_id in self.remote or object_id in self.held_returns
                or self.store.entry(object_id) is not None
                or object_id[:-8] in self.owned_prefixes)

    def fetch(self, node, object_ids: list) -> None:
        with self.lock:
            ours = [i for i in object_ids if self._ours(i)]
        lost = [i for i in object_ids if i not in ours]
        for object_id in lost:
            sobj = serialize(exc.OwnerDiedError(
                f"object {object_id.hex()} was owned by a driver that left"), is_error=True)
            try:
                P.send_object(node.conn, object_id, sobj)
            except exc.BackendError:
                return  # the node is gone
        if ours:
            super().fetch(node, ours)

    def task_finished(self, event) -> None:
        pass  # (no driver-side observers: see the class)

    def actor_state(self, event) -> None:
        if event.state == ActorState.DEAD.value:
            with self.lock:
                self._actor_ended(event.actor_id)


class HeirBackend(ClusterBackend):
    """A cluster driver that runs in a node daemon as the heir of a job whose
    driver left (see the module's docstring)."""

    accepted_options = frozenset({"token", "heir", "job_id"})
    scheduler_class = HeirScheduler
    task_events = False  # (its job's tasks report to nobody)
    direct_calls = False  # (its actors' calls stay on the node's path: no port of its own)

    def __init__(self, config: dict, runtime):
        self._heir_config = config["heir"]
        super().__init__({k: v for k, v in config.items() if k != "heir"}, runtime)

    def job_config(self) -> dict:
        return {**self._heir_config, "task_events": False, "cluster": True,
                "streaming_generators": self.streaming_generators}


def start_heir(address: str, secret: bytes, job_config: dict, started, failed):
    """Start an heir of the job `job_config` describes (a DriverLink's
    settings), joining the cluster at `address` with `secret`; returns
    ``(nonce, thread)``: its DriverHello carries ``heir_of=nonce``; once
    started, the thread calls ``started(runtime)`` (the heir's Runtime), or
    ``failed(error)``. Start the thread: the heir's joining waits for this
    node's own answers."""
    from ...core.runtime import Runtime
    nonce = secrets.token_hex(16)
    settings = {k: v for k, v in job_config.items() if k != HEIR_KEY}
    settings[HEIR_KEY] = nonce
    config = {"address": address, "token": secret.hex(), "heir": settings,
              "job_id": settings.get("job_id") or None,
              "namespace": settings.get("namespace") or None,
              "runtime_env": settings.get("runtime_env") or None,
              "job_metadata": settings.get("job_metadata") or None,
              "default_actor_lifetime": settings.get("default_actor_lifetime") or None}

    def run() -> None:
        try:
            runtime = Runtime(HeirBackend, config)
        except BaseException as err:  # noqa: BLE001 - the node carries on without an heir
            failed(err)
            return
        started(runtime)

    return nonce, threading.Thread(target=run, name="beamlet-heir-start", daemon=True)
