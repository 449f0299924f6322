"""Scheduling rules that every scheduler applies the same way, whatever runs
the tasks: how many attempts a task gets, what observers are told about
each attempt (the ``beamlet_task_finished`` hook's statuses), and the
lifecycle an actor goes through (`ActorLifecycle`).

A scheduler that runs attempts one after another in one place (in-process,
threads) can hand the whole loop to `run_attempts`; one that sends attempts
to other processes (local workers, cluster nodes) asks `may_retry` when an
attempt comes back failed and reports with `attempt_status`.
"""
from __future__ import annotations

import enum
import os
import time
from typing import Callable

from . import plugins
from ..exceptions import TaskCancelledError
from .tables import ActorState

#: What an attempt's end is reported as.
FINISHED = "FINISHED"    # it returned (its values are the task's results)
FAILED = "FAILED"        # it raised (or its worker died), and no attempt follows
RETRYING = "RETRYING"    # it failed, and another attempt follows
CANCELLED = "CANCELLED"  # it was cancelled


class ActorLifecycle(enum.StrEnum):
    """Where an actor is in its life, as its scheduler tracks it.

    ``PENDING -> STARTING -> ALIVE``; from STARTING or ALIVE its process may
    die (``RESTARTING``, while restarts are left; back to STARTING when a new
    process runs the constructor again) or it ends (``DEAD``, final, from any
    state). The control store records the coarser `ActorState`
    (`recorded`): STARTING shows there as PENDING.
    """

    PENDING = "PENDING"        # waiting for its arguments, resources or a worker
    STARTING = "STARTING"      # its constructor is running
    ALIVE = "ALIVE"
    RESTARTING = "RESTARTING"  # its process died; it waits to start again
    DEAD = "DEAD"

    @property
    def recorded(self) -> ActorState:
        """The state the actors table shows for this one."""
        return ActorState.PENDING if self is ActorLifecycle.STARTING else ActorState(self.value)

    def to(self, new: "ActorLifecycle") -> "ActorLifecycle":
        """`new`, if an actor may go there from this state; RuntimeError (a
        scheduler bug) if not."""
        if new not in _ACTOR_MOVES[self]:
            raise RuntimeError(f"an actor cannot go from {self} to {new}")
        return new


_ACTOR_MOVES = {
    ActorLifecycle.PENDING: {ActorLifecycle.STARTING, ActorLifecycle.DEAD},
    ActorLifecycle.STARTING: {ActorLifecycle.ALIVE, ActorLifecycle.RESTARTING,
                              ActorLifecycle.DEAD},
    ActorLifecycle.ALIVE: {ActorLifecycle.RESTARTING, ActorLifecycle.DEAD},
    ActorLifecycle.RESTARTING: {ActorLifecycle.STARTING, ActorLifecycle.DEAD},
    ActorLifecycle.DEAD: set(),
}


def may_retry(spec, actor_spec=None) -> bool:
    """Whether a failed attempt of `spec` gets another one.

    Counts the attempts made so far past the first (``spec.attempt``) against
    ``max_retries``, and for an actor's method call also the actor's
    ``max_task_retries`` (the larger budget wins; -1 means without limit).
    Which failures are retried at all is the caller's business: system
    failures always, exceptions only as ``retry_exceptions`` says."""
    budgets = [spec.max_retries]
    if actor_spec is not None:
        budgets.append(actor_spec.actor_options["max_task_retries"])
    if -1 in budgets:
        return True
    return spec.attempt < max(budgets)


def attempt_status(failed: bool, retrying: bool = False, cancelled: bool = False) -> str:
    """The status observers are told for one attempt's end."""
    if cancelled:
        return CANCELLED
    if not failed:
        return FINISHED
    return RETRYING if retrying else FAILED


def run_attempts(spec, execute: Callable, actor_spec=None, retries: bool = True):
    """Run `spec` through ``execute(spec) -> ExecutionResult`` until an attempt
    succeeds, fails for good, or (``retries=False``) once; observers hear of
    each attempt. Returns the last attempt's result. Only failures that
    ``spec.retry_exceptions`` asks to retry (``result.retryable``) are retried.
    An attempt interrupted by ``cancel`` (its error a ``TaskCancelledError``)
    is reported ``CANCELLED``."""
    while True:
        start = time.perf_counter()
        result = execute(spec)
        retry = retries and result.retryable and may_retry(spec, actor_spec)
        plugins.notify("beamlet_task_finished", spec=spec,
                       status=attempt_status(result.error is not None, retry,
                                             isinstance(result.error, TaskCancelledError)),
                       duration=time.perf_counter() - start, pid=os.getpid())
        if not retry:
            return result
        spec.attempt += 1
