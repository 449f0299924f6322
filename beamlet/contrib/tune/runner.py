"""TrialRunner: runs an experiment's trials as beamlet actors, from the driver.

Each trial is one actor created with the trial's resources (``num_cpus``,
``num_gpus``, custom), so the backend places it; the runner also keeps its
own account of what the running trials hold and starts a trial only when it
fits (6 one-CPU trials on 2 CPUs run 2 at a time). The loop waits on the
trials' ``step()`` refs with ``beamlet.wait``; each ready ref is one event of
one trial, or a batch of them from a trial that runs ahead (see
``trial_actor`` and ``_runs_ahead``). For each result the runner asks, in order:
did the trial end itself (a dict stop criterion or ``done``)? does the
experiment's stopper say stop? and otherwise the scheduler, which answers
CONTINUE, PAUSE or STOP. Then it logs the result (callbacks: JSON, CSV,
TensorBoard, the user's) and either calls ``step()`` again or stops the trial.
The built-in loggers run on a thread of their own (``BackgroundLoggers``):
creating a trial's files waits on the disk, and the loop need not.

Only beamlet's public API is used, so this runs on any backend. On
``inprocess`` each ``.remote()`` runs at once, so trials advance one result
at a time, in turn.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
import traceback
import warnings

import beamlet
from beamlet import exceptions as bexc
from beamlet.core import runtime

from .error import TuneError
from .loggers import BackgroundLoggers, Callback
from .progress import ProgressReporter
from .result import json_default
from .schedulers import FIFOScheduler, TrialScheduler
from .stopper import DictStopper, NoopStopper, TimeoutStopper, lookup, missing_criteria
from .trial import ERROR, PAUSED, PENDING, RUNNING, TERMINATED, Trial, resources_to_actor_options
from .experiment_state import ExperimentStateLog
from .trial_actor import TrialActor

__all__ = ["TrialRunner"]

_EPS = 1e-9
# Stoppers that stop no trial at a result unless the trial stops itself there
# (a dict's criteria are also checked by the trial's reporter; a timeout ends
# the experiment between results, not at one).
# Of those, the ones that need no per-result check at all.
_STOPPERS_NONE_PER_RESULT = (type(None), NoopStopper, TimeoutStopper)
_STOPPERS_THE_TRIAL_APPLIES = _STOPPERS_NONE_PER_RESULT + (DictStopper,)
_WAIT_TIMEOUT_S = 0.5
_STOP_TIMEOUT_S = 15.0

_actor_class = None


def trial_actor_class():
    """``beamlet.remote(TrialActor)``, made once."""
    global _actor_class
    if _actor_class is None:
        _actor_class = beamlet.remote(TrialActor)
    return _actor_class


def _error_text(err: BaseException) -> str:
    """What a trial's error says: the remote traceback for a task error, the
    message for a system error (the actor died, ...); the driver's own frames
    only for other exceptions."""
    if isinstance(err, bexc.BeamletError):
        return f"{type(err).__name__}: {err}"
    return "".join(traceback.format_exception(type(err), err, err.__traceback__))


class TrialRunner:
    """Runs the trials of one or more experiments to their end."""

    def __init__(self, experiments: list, *, scheduler: TrialScheduler | None = None,
                 callbacks: list[Callback] | None = None,
                 progress: ProgressReporter | None = None,
                 max_concurrent_trials: int | None = None, fail_fast: bool = False,
                 stopper=None, metric: str | None = None, resume: bool = False,
                 reuse_actors: bool | None = None):
        if max_concurrent_trials is not None and (
                isinstance(max_concurrent_trials, bool) or
                not isinstance(max_concurrent_trials, int) or max_concurrent_trials < 1):
            raise ValueError(f"max_concurrent_trials must be an integer >= 1, got "
                             f"{max_concurrent_trials!r}")
        self._experiments = list(experiments)
        self._scheduler = scheduler if scheduler is not None else FIFOScheduler()
        self._callbacks = list(callbacks or [])
        # The built-in loggers run on a thread of their own (see BackgroundLoggers).
        self._background = BackgroundLoggers(self._callbacks)
        self._foreground = [cb for cb in self._callbacks
                            if not any(cb is b for b in self._background.callbacks)]
        self._progress = progress if progress is not None else ProgressReporter(verbose=0)
        self._max_concurrent = max_concurrent_trials
        self._fail_fast = fail_fast
        self._global_stopper = stopper
        self._metrics = {m for m in (metric, getattr(self._scheduler, "metric", None)) if m}
        self._metrics.update(e.search_alg.searcher.metric for e in self._experiments
                             if getattr(getattr(e.search_alg, "searcher", None), "metric", None))
        self._trials: list[Trial] = []
        self._inflight: dict = {}    # step ref -> Trial
        self._strays: dict = {}      # step refs of trials that ended first -> None
        self._stopping: dict = {}    # stop ref -> (trial, resources, actor, deadline, then)
        self._used: dict[str, float] = {}
        self._total: dict[str, float] = {}
        self._trainable_refs: dict[int, tuple] = {}
        self._iteration = 0
        self._finished_upto = 0      # self._trials[:this] are all finished
        self._stop_everything = False
        self._warned_missing: set = set()
        self._interrupted = False
        self._may_start = True       # something changed since the scheduler last chose none
        self._resume = resume
        # Actors of ended trials, kept to run the next trial with the same resources:
        # no new worker (nor imports) per trial.
        self._reuse = True if reuse_actors is None else bool(reuse_actors)
        # (resources key, actor, id of the trainable it has)
        self._pool: list[tuple[tuple, object, int]] = []
        self._actors_made = 0
        self._preloaded = False
        self._logs: dict[str, ExperimentStateLog] = {}
        self.fail_fast_trial: Trial | None = None
        #: How many times a trial went back to PENDING (a retry): schedulers that
        #: keep a cursor over the trials start again from the first one.
        self.requeue_count = 0
        self._paused: dict[Trial, None] = {}   # PAUSED trials, in the order they paused
        self._search_dirty: set[str] = set()  # experiments whose search state changed
        self._scheduler_logged = 0   # the scheduler's state_changes last logged
        self._warned_search: set[str] = set()
        # Whether each result that does not end its trial is answered "continue"
        # (the scheduler does not decide per result, no stopper does): then a
        # trial runs ahead of the driver (see _runs_ahead).
        self._always_continue = type(stopper) in _STOPPERS_NONE_PER_RESULT and \
            type(self._scheduler).on_trial_result is TrialScheduler.on_trial_result
        self._parallel = False  # (the backend's, at _setup)

    # -- what schedulers see -------------------------------------------------------
    def get_trials(self) -> list[Trial]:
        return self._trials

    def has_resources_for_trial(self, trial: Trial) -> bool:
        if self._max_concurrent is not None and self._num_running() >= self._max_concurrent:
            return False
        return all(self._used.get(name, 0.0) + amount <= self._total.get(name, 0.0) + _EPS
                   for name, amount in trial.resources.items())

    def paused_trials(self) -> list[Trial]:
        """The PAUSED trials, longest paused first."""
        return list(self._paused)

    def _num_running(self) -> int:
        return sum(1 for t in self._trials if t.status == RUNNING)

    def stop_trial(self, trial: Trial) -> None:
        """End a PENDING, PAUSED or RUNNING trial (TERMINATED), for a scheduler."""
        self._paused.pop(trial, None)
        if trial.status in (PENDING, PAUSED):
            trial.status = TERMINATED
            trial.end_time = time.time()
            self._log_final_row(trial)
            self._scheduler.on_trial_complete(self, trial, trial.last_result)
            self._search_complete(trial)
            self._log_trial(trial)
            self._call("on_trial_complete", trial=trial)
            self._progress.on_trial_complete(trial)
        elif trial.status == RUNNING and trial._actor is None:
            trial._stop_requested = True  # it is pausing: end it once it has
        elif trial.status == RUNNING:
            self._drop_steps(trial)
            self._log_final_row(trial)
            self._complete_trial(trial, stop_actor=True)

    def save_trial(self, trial: Trial) -> str | None:
        """A checkpoint of a RUNNING trial now, between its results (a class
        trainable saves one; a function trainable's is its latest reported),
        or None if it cannot make one. Waits for the trial's actor."""
        if trial._actor is None:
            return trial.checkpoint
        try:
            path = beamlet.get(trial._actor.save.remote(), timeout=_STOP_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - the trial's next step reports the failure
            return trial.checkpoint
        if path:
            trial.on_checkpoint(path)
        return trial.checkpoint

    # -- the loop ---------------------------------------------------------------
    def run(self) -> list[Trial]:
        restore_sigint = self._defer_sigint()
        try:
            try:
                self._setup()
                while not self.is_finished():
                    self.step()
                    if self._interrupted:
                        raise KeyboardInterrupt
            except BaseException:
                self._abort()
                raise
            finally:
                self._finish()
        finally:
            restore_sigint()
        return self._trials

    def _defer_sigint(self):
        """While the run goes on, a first Ctrl-C only asks the loop to stop at its
        next safe point (a KeyboardInterrupt in the middle of a logger can leave
        a library's lock held and hang the clean-up); a second one interrupts at
        once. Only in the main thread, and only over Python's default handler."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = signal.getsignal(signal.SIGINT)
        if previous is not signal.default_int_handler:
            return lambda: None

        def handler(signum, frame):
            self._interrupted = True
            signal.signal(signal.SIGINT, previous)
            if self._progress.verbose >= 1:
                try:  # a raw write: safe even if the signal came in the middle of a print
                    os.write(2, b"\nbeamlet.tune: stopping the run after its trials' next "
                                b"results (Ctrl-C again to force)\n")
                except OSError:
                    pass

        signal.signal(signal.SIGINT, handler)

        def restore():
            if signal.getsignal(signal.SIGINT) is handler:
                signal.signal(signal.SIGINT, previous)

        return restore

    def _setup(self) -> None:
        self._total = dict(beamlet.cluster_resources())
        self._parallel = runtime.current().backend.parallel
        if not self._reuse:  # (every trial a new actor: see _preload)
            self._preload()
        for exp in self._experiments:
            os.makedirs(exp.path, exist_ok=True)
            log = self._logs[exp.path] = ExperimentStateLog(exp.path)
            if self._resume:
                self._restore(exp)
            elif log.exists():
                os.remove(log.path)  # a new run in the same directory
        self._add_new_trials()
        for cb in self._callbacks:
            cb.setup(total_num_samples=len(self._trials),
                     experiments=[e.name for e in self._experiments])
        self._progress.start(self._experiments, len(self._trials))

    def _restore(self, exp) -> None:
        logged = ExperimentStateLog.read_log(exp.path)
        search = None
        if logged.search is not None:
            try:
                search = ExperimentStateLog.load_search(logged.search)
            except Exception as err:  # noqa: BLE001 - e.g. the searcher's module is gone
                raise TuneError(f"cannot resume {exp.path}: its search algorithm's state "
                                f"does not load ({type(err).__name__}: {err})") from err
        trials = exp.restore_trials(logged.records, search)
        if logged.scheduler is not None:
            self._scheduler.set_state(logged.scheduler)
        if logged.scheduler_updates:
            self._scheduler.apply_state_updates(logged.scheduler_updates)
        self._scheduler_logged = getattr(self._scheduler, "state_changes", 0)
        for trial in trials:
            self._check_feasible(trial)
            self._trials.append(trial)
            if trial.status == PAUSED:
                self._paused[trial] = None
            if not trial.is_finished():
                self._scheduler.on_trial_add(self, trial)

    def _add_new_trials(self) -> None:
        for exp in self._experiments:
            if exp.is_finished():
                continue
            pending = 0
            if exp.search_alg.max_pending is not None:
                pending = sum(1 for t in self._trials if t._experiment is exp and
                              t.status == PENDING)
            added = exp.next_trials(pending)
            for trial in added:
                self._check_feasible(trial)
                self._trials.append(trial)
                self._scheduler.on_trial_add(self, trial)
                self._may_start = True
            if added:
                self._search_dirty.add(exp.path)
                self._log_trials(exp.path, added)

    def _check_feasible(self, trial: Trial) -> None:
        for name, amount in trial.resources.items():
            have = self._total.get(name, 0.0)
            if amount > have + _EPS:
                raise TuneError(f"trial {trial} asks for {amount:g} {name}, but the cluster "
                                f"has {have:g} (resources: {self._total}); it could never run. "
                                f"Lower resources_per_trial, or init() with more.")

    def is_finished(self) -> bool:
        if self._inflight or self._stopping or self._strays or \
                not all(exp.is_finished() for exp in self._experiments):
            return False
        # A finished trial stays finished (TERMINATED, ERROR): those before the
        # cursor are not looked at again, so the check is not a scan per step.
        trials, i = self._trials, self._finished_upto
        while i < len(trials) and trials[i].is_finished():
            i += 1
        self._finished_upto = i
        return i == len(trials)

    def step(self) -> None:
        """One turn of the loop: start what fits, then handle what is ready."""
        self._iteration += 1
        self._check_stop_all()
        if not self._stop_everything:
            self._add_new_trials()
            self._start_trials()
        self._progress.maybe_report(self._trials)
        refs = list(self._inflight) + list(self._stopping) + list(self._strays)
        if not refs:
            if not self.is_finished():
                if self._stop_everything:
                    return
                waiting = [t for t in self._trials if t.status == PENDING]
                raise TuneError(f"{len(waiting)} trial(s) are pending but none can start "
                                f"(the scheduler chose none); this is a bug in the scheduler "
                                f"{type(self._scheduler).__name__}")
            return
        ready, _ = beamlet.wait(refs, num_returns=1, timeout=_WAIT_TIMEOUT_S)
        if ready and len(refs) > 1:
            ready, _ = beamlet.wait(refs, num_returns=len(refs), timeout=0)
        for ref in ready:
            trial = self._inflight.pop(ref, None)
            if trial is not None:
                trial._steps.remove(ref)
                self._process_event(ref, trial)
            elif ref in self._stopping:
                self._finish_stop(ref)
            elif ref in self._strays:
                del self._strays[ref]
                try:  # (its trial has ended: what it says is of no use, but is taken)
                    beamlet.get(ref, timeout=0)
                except Exception:  # noqa: BLE001 - e.g. the actor was killed meanwhile
                    pass
        self._expire_stopping()

    def _start_trials(self) -> None:
        # Only when a trial was added or resources were freed since the scheduler
        # last chose none: choosing may look at every trial.
        while self._may_start and not self._stop_everything:
            trial = self._scheduler.choose_trial_to_run(self)
            if trial is None:
                self._may_start = False
                return
            if trial.status not in (PENDING, PAUSED):
                raise TuneError(f"the scheduler chose trial {trial}, which is {trial.status}")
            self._start_trial(trial)

    def _preload(self) -> None:
        """Have the workers started from now on import the trial actor's module
        (~50 ms less per new worker, where the backend can do it). Not at the
        start when actors are reused: the workers the backend keeps ready
        would run every trial, and the import would only take CPU from them
        just when the trials start."""
        self._preloaded = True
        preload = getattr(runtime.current().backend, "preload", None)
        if preload is not None:
            preload([TrialActor.__module__])

    def _trainable_ref(self, trial: Trial):
        """The trainable in the object store: pickled once per experiment, not per trial."""
        key = id(trial._trainable)
        entry = self._trainable_refs.get(key)
        if entry is None:
            entry = self._trainable_refs[key] = (trial._trainable, beamlet.put(trial._trainable))
        return entry[1]

    def _start_trial(self, trial: Trial) -> None:
        was_paused = trial.status == PAUSED
        self._paused.pop(trial, None)
        trial.status = RUNNING
        trial.start_time = time.time()
        trial._stop_requested = False
        self._acquire(trial.resources)
        # (The trial's directory is made by its actor, before the trainable starts,
        # with the loggers' files, and by the loggers if they get there first:
        # not here, in the loop.)
        info = {"trial_id": trial.trial_id, "trial_name": trial.trial_name,
                "experiment_tag": trial.experiment_tag, "logdir": trial.path,
                "experiment_name": trial.experiment_name}
        if not trial.started:
            trial.started = True
            info["log_files"] = self._background.trial_files(trial)  # (before they start)
            self._call("on_trial_start", trial=trial)
        trainable = self._trainable_ref(trial)
        options = {"restore": trial.take_restore_path(), "checkpoint_freq": trial.checkpoint_freq,
                   "checkpoint_at_end": trial.checkpoint_at_end,
                   "run_ahead": self._runs_ahead(trial)}
        try:
            actor, has = self._pooled_actor(trial.resources)
            if actor is not None:
                # (None: the one it has, which it need not load again)
                ref = actor.reset_and_step.remote(
                    None if has == id(trial._trainable) else trainable, {
                    "config": trial.config, "trial_info": info,
                    "stop_criteria": trial.stop_criteria, "options": options})
            else:
                self._actors_made += 1
                if not self._preloaded and self._actors_made > self._total.get("CPU", 0):
                    self._preload()  # (more actors than the workers kept ready)
                actor = trial_actor_class() \
                    .options(**resources_to_actor_options(trial.resources)) \
                    .remote(trainable, trial.config, info, trial.stop_criteria, options)
                ref = actor.step.remote()
        except Exception as err:  # noqa: BLE001 - e.g. a config that cannot be pickled
            trial._actor = None
            self._on_trial_error(trial, f"the trial could not start:\n{_error_text(err)}")
            return
        trial._actor = actor
        self._inflight[ref] = trial
        trial._steps.append(ref)
        if was_paused:
            # Else the log would still say PAUSED: resumed, the trial would wait
            # for a scheduler that no longer means to resume it.
            self._log_trial(trial)

    # -- events --------------------------------------------------------------------
    def _process_event(self, ref, trial: Trial) -> None:
        try:
            event = beamlet.get(ref)
        except bexc.TaskCancelledError:
            # inprocess: Ctrl-C while the trial's step ran in this thread.
            raise KeyboardInterrupt from None
        except Exception as err:  # noqa: BLE001 - the actor died, the worker crashed, ...
            self._on_trial_error(trial, _error_text(err))
            return
        if isinstance(event, dict) and event.get("kind") == "batch":
            self._process_batch(trial, event["events"])
            return
        self._handle_event(trial, event)

    def _process_batch(self, trial: Trial, events: list) -> None:
        """The events of a trial that runs ahead, in order; then ask for more
        unless the trial has ended (or a scheduler stopped it meanwhile)."""
        actor = trial._actor
        for event in events:
            if trial.status != RUNNING or trial._actor is not actor:
                return  # (it ended: the rest is of no use, as a stray step's)
            self._handle_event(trial, event, ask=False)
        if trial.status == RUNNING and trial._actor is actor and not trial._steps and \
                events[-1].get("kind") == "result" and not events[-1]["result"].get("done"):
            self._ask_step(trial)

    def _handle_event(self, trial: Trial, event, ask: bool = True) -> None:
        kind = event.get("kind") if isinstance(event, dict) else None
        if isinstance(event, dict) and event.get("checkpoint"):
            trial.on_checkpoint(event["checkpoint"])
            self._log_trial(trial)
        if kind == "result":
            self._on_result(trial, event["result"], ask)
        elif kind == "done":
            self._on_trial_returned(trial)
        else:
            self._on_trial_error(trial, (event or {}).get("error") or f"bad event {event!r:.200}")

    def _runs_ahead(self, trial: Trial) -> bool:
        """Whether `trial` runs ahead (see trial_actor): its trainable goes on
        without waiting for the driver's answer to each result, and each step
        returns the results that came meanwhile. Only where the answer is
        known to be "continue" (else the trial would run a step it should not),
        and where calls run apart from the driver (on ``inprocess`` the trial
        would run inside the loop, before the results it follows are even logged)."""
        return self._always_continue and self._parallel and \
            type(trial._stopper) in _STOPPERS_THE_TRIAL_APPLIES

    def _ask_step(self, trial: Trial) -> None:
        """Ask the trial's actor for its next event."""
        try:
            ref = trial._actor.step.remote()
        except Exception as err:  # noqa: BLE001 - e.g. the actor is dead
            self._on_trial_error(trial, _error_text(err))
            return
        self._inflight[ref] = trial
        trial._steps.append(ref)

    def _drop_steps(self, trial: Trial) -> None:
        """The trial's steps still asked for will not be handled as its events
        (it ended, pauses or fails): they are waited for and ignored."""
        for ref in trial._steps:
            if self._inflight.pop(ref, None) is not None:
                self._strays[ref] = None
        trial._steps.clear()

    def _check_metrics(self, trial: Trial, result: dict) -> None:
        """As Ray: the first result of a trial must hold the metric that tune.run
        and the scheduler optimise, else the search would silently mean nothing."""
        for metric in self._metrics:
            if not lookup(result, metric)[0]:
                shown = ", ".join(sorted(k for k in result if k != "config"))
                raise ValueError(f"trial {trial} reported a result without the metric "
                                 f"{metric!r} that tune.run / the scheduler optimise "
                                 f"(it reported: {shown}); report it with tune.report()")

    def _on_result(self, trial: Trial, result: dict, ask: bool = True) -> None:
        """Decide on `result`, log it, then go on with the trial (`ask`: ask for
        its next step; else its caller does, see _process_batch) or end it."""
        if trial.num_results == 0 and self._metrics:
            self._check_metrics(trial, result)
        decision = TrialScheduler.CONTINUE
        ended_itself = bool(result.get("done"))
        if ended_itself or trial._stop_requested or self._stop_everything:
            decision = TrialScheduler.STOP
        elif trial._stopper is not None and trial._stopper(trial.trial_id, result):
            decision = TrialScheduler.STOP
        elif self._global_stopper is not None and self._global_stopper(trial.trial_id, result):
            decision = TrialScheduler.STOP
        else:
            decision = self._scheduler.on_trial_result(self, trial, result)
            if decision != TrialScheduler.STOP and not self._always_continue:
                # (a STOP's state goes in one write with the trial's end, below)
                self._log_scheduler()
        if decision == TrialScheduler.STOP:
            result["done"] = True
        self._warn_missing_criteria(trial, result)
        trial.update_last_result(result)
        if trial._experiment is not None:
            trial._experiment.search_alg.on_trial_result(trial.trial_id, result)
        self._call("on_trial_result", trial=trial, result=result)
        self._progress.on_trial_result(trial, result)
        if decision == TrialScheduler.CONTINUE:
            if ask:
                self._ask_step(trial)
        elif decision == TrialScheduler.STOP:
            self._complete_trial(trial, stop_actor=not ended_itself)
        elif decision == TrialScheduler.PAUSE:
            self._pause_trial(trial)
        else:
            raise TuneError(f"the scheduler {type(self._scheduler).__name__} returned "
                            f"{decision!r}; expected CONTINUE, PAUSE or STOP")

    def _on_trial_returned(self, trial: Trial) -> None:
        """The trainable returned without a final result."""
        if trial.last_result:
            self._log_final_row(trial)
        else:
            trial.last_result = {"done": True, "trial_id": trial.trial_id,
                                 "training_iteration": 0, "config": trial.config}
        self._complete_trial(trial, stop_actor=False)

    def _pause_trial(self, trial: Trial) -> None:
        """Stop the trial's actor, saving a checkpoint, and make it PAUSED once
        the actor has stopped; a scheduler resumes it by choosing it to run."""
        self._drop_steps(trial)
        actor, trial._actor = trial._actor, None

        def paused(path: str | None) -> None:
            if path:
                trial.on_checkpoint(path)
            if trial.status == RUNNING:
                trial.status = PAUSED
                self._paused[trial] = None
                self._log_trial(trial)
                if trial._stop_requested:
                    trial._stop_requested = False
                    self.stop_trial(trial)
        try:
            ref = actor.stop.remote(True)
        except Exception as err:  # noqa: BLE001 - the actor is dead
            trial._actor = actor
            self._on_trial_error(trial, _error_text(err))
            return
        self._stopping[ref] = (trial, trial.resources, actor,
                               time.monotonic() + _STOP_TIMEOUT_S, paused)

    def _complete_trial(self, trial: Trial, stop_actor: bool) -> None:
        trial.status = TERMINATED
        trial.end_time = time.time()
        self._release_actor(trial, "stop" if stop_actor else "end", reusable=True)
        self._scheduler.on_trial_complete(self, trial, trial.last_result)
        self._search_complete(trial)
        self._call("on_trial_complete", trial=trial)
        self._progress.on_trial_complete(trial)
        self._log_trial(trial)

    def _on_trial_error(self, trial: Trial, text: str) -> None:
        trial.error_msg = text
        try:
            os.makedirs(trial.path, exist_ok=True)
            trial.error_file = os.path.join(trial.path, "error.txt")
            with open(trial.error_file, "a") as f:
                f.write(text)
        except OSError:
            trial.error_file = None
        self._release_actor(trial, "end")
        if not self._stop_everything and (trial.max_failures < 0 or
                                          trial.num_failures < trial.max_failures):
            # Retried from its latest checkpoint (from the start without one).
            trial.num_failures += 1
            trial.status = PENDING
            self.requeue_count += 1
            self._may_start = True
            self._log_trial(trial)
            return
        trial.status = ERROR
        trial.end_time = time.time()
        self._scheduler.on_trial_error(self, trial)
        self._search_complete(trial, error=True)
        self._call("on_trial_error", trial=trial)
        self._progress.on_trial_error(trial)
        self._log_trial(trial)
        if self._fail_fast and self.fail_fast_trial is None:
            self.fail_fast_trial = trial
            self._stop_all()

    # -- stopping ------------------------------------------------------------------
    def _check_stop_all(self) -> None:
        if self._stop_everything:
            return
        stoppers = [exp.stopper for exp in self._experiments]
        if self._global_stopper is not None:
            stoppers.append(self._global_stopper)
        if any(s.stop_all() for s in stoppers):
            self._stop_all()

    def _stop_all(self) -> None:
        """End the experiment now: pending trials never start; running ones are
        stopped at once (their actors killed), not at their next result."""
        self._stop_everything = True
        self._paused.clear()
        for trial in self._trials:
            if trial.status in (PENDING, PAUSED):
                trial.status = TERMINATED
                self._scheduler.on_trial_remove(self, trial)
                self._log_trial(trial)
            elif trial.status == RUNNING:
                trial.status = TERMINATED
                trial.end_time = time.time()
                self._release_actor(trial, "abort")
                self._scheduler.on_trial_remove(self, trial)
                self._search_complete(trial)
                self._log_final_row(trial)
                self._log_trial(trial)
                self._call("on_trial_complete", trial=trial)

    def _log_final_row(self, trial: Trial) -> None:
        """A trial that ended after a result without ``done`` gets, as in Ray, one
        more row: that result again with ``done: True`` (the last row of
        ``result.json`` then says the trial is done)."""
        if trial.last_result and not trial.last_result.get("done"):
            trial.last_result = dict(trial.last_result, done=True)
            self._call("on_trial_result", trial=trial, result=trial.last_result)

    @staticmethod
    def _pool_key(resources: dict) -> tuple:
        return tuple(sorted(resources.items()))

    def _pooled_actor(self, resources: dict):
        """An idle actor holding exactly `resources`, or None; idle actors holding
        others are killed then, so that the backend has their resources back."""
        key = self._pool_key(resources)
        for i, (pooled_key, actor, has) in enumerate(self._pool):
            if pooled_key == key:
                del self._pool[i]
                return actor, has
        self._drain_pool()
        return None, None

    def _drain_pool(self) -> None:
        pool, self._pool = self._pool, []
        for _, actor, _ in pool:
            self._kill(actor)

    def _retire(self, actor, resources: dict, reusable: bool, trial: Trial) -> None:
        """The trial on `actor` has ended: keep the actor for the next trial, or kill it."""
        if reusable and self._reuse and not self._stop_everything:
            self._pool.append((self._pool_key(resources), actor, id(trial._trainable)))
        else:
            # Killed rather than dropped even when the trainable has ended: the
            # backend then frees the trial's resources at once, for the next trial.
            self._kill(actor)
        self._release(resources)

    def _release_actor(self, trial: Trial, how: str, reusable: bool = False) -> None:
        """Let the trial's actor go; its resources count as free once it has stopped.

        ``how``: "end" (the trainable has ended), "stop" (it waits in its
        reporter: let it unwind first) or "abort" (it may be running: ask it
        to stop, and kill it at once)."""
        self._drop_steps(trial)
        actor, trial._actor = trial._actor, None
        if actor is None:
            self._release(trial.resources)
            return
        if how in ("stop", "abort"):
            try:
                ref = actor.stop.remote()
            except Exception:  # noqa: BLE001 - the actor is dead already
                ref = None
            if ref is not None and how == "stop":
                self._stopping[ref] = (trial, trial.resources, actor,
                                       time.monotonic() + _STOP_TIMEOUT_S, None)
                return
        self._retire(actor, trial.resources, reusable and how == "end", trial)

    def _finish_stop(self, ref) -> None:
        trial, resources, actor, _, then = self._stopping.pop(ref)
        try:
            path = beamlet.get(ref, timeout=0)
            stopped = True
        except Exception:  # noqa: BLE001 - the actor is going away regardless
            path, stopped = None, False
        self._retire(actor, resources, stopped, trial)
        if isinstance(path, str) and then is None:
            trial.on_checkpoint(path)  # checkpoint_at_end
        if then is not None:
            then(path if isinstance(path, str) else None)

    def _expire_stopping(self) -> None:
        now = time.monotonic()
        for ref, (trial, resources, actor, deadline, then) in list(self._stopping.items()):
            if now >= deadline:
                del self._stopping[ref]
                self._kill(actor)
                self._release(resources)
                if then is not None:
                    then(None)

    @staticmethod
    def _kill(actor) -> None:
        try:
            beamlet.kill(actor)
        except Exception:  # noqa: BLE001 - already dead
            pass

    def _acquire(self, resources: dict) -> None:
        for name, amount in resources.items():
            self._used[name] = self._used.get(name, 0.0) + amount

    def _release(self, resources: dict) -> None:
        for name, amount in resources.items():
            self._used[name] = max(0.0, self._used.get(name, 0.0) - amount)
        self._may_start = True

    def _abort(self) -> None:
        """The driver failed (or Ctrl-C): stop every actor now."""
        # Every trial with an actor, not only those with a step in flight: the
        # error may have come from handling a trial's result.
        for trial in self._trials:
            if trial._actor is not None:
                self._release_actor(trial, "abort")
        self._inflight.clear()
        self._strays.clear()
        for _, _, actor, _, _ in self._stopping.values():
            self._kill(actor)
        self._stopping.clear()
        self._drain_pool()

    def _finish(self) -> None:
        self._drain_pool()
        self._trainable_refs.clear()
        try:
            try:
                # (First: the loggers' thread meanwhile writes what is still queued.)
                for exp in self._experiments:
                    self._save_state(exp.path)
            finally:
                self._call_experiment_end()
        finally:
            for exp in self._experiments:
                if exp.path in self._logs:
                    self._logs[exp.path].close()
            self._progress.finish(self._trials)

    # -- helpers -------------------------------------------------------------------
    def _search_complete(self, trial: Trial, error: bool = False) -> None:
        if trial._experiment is not None:
            search_alg = trial._experiment.search_alg
            search_alg.on_trial_complete(trial.trial_id, result=trial.last_result or None,
                                         error=error)
            if search_alg.learns:
                self._search_dirty.add(trial.experiment_path)

    def _call(self, hook: str, **kwargs) -> None:
        kwargs["iteration"], kwargs["trials"] = self._iteration, self._trials
        self._background.call(hook, kwargs)
        for cb in self._foreground:
            getattr(cb, hook)(**kwargs)

    def _call_experiment_end(self) -> None:
        try:
            for cb in self._foreground:
                cb.on_experiment_end(trials=self._trials)
        finally:
            self._background.close(self._trials)

    def _warn_missing_criteria(self, trial: Trial, result: dict) -> None:
        if not trial.stop_criteria or trial.num_results > 0:
            return
        for key in missing_criteria(trial.stop_criteria, result):
            if key not in self._warned_missing:
                self._warned_missing.add(key)
                shown = sorted(k for k in result if k != "config")
                warnings.warn(f"stop criterion {key!r} is not in the results of trial {trial} "
                              f"(it reported: {', '.join(shown)}); it will not stop trials",
                              stacklevel=2)

    def _scheduler_entries(self) -> list[dict]:
        """Log lines for what changed in the scheduler's state since the last
        ones: its whole state (see TrialScheduler.state_changes), its updates
        (TrialScheduler.pop_state_updates)."""
        entries = []
        changes = getattr(self._scheduler, "state_changes", 0)
        if changes != self._scheduler_logged:
            self._scheduler_logged = changes
            entries.append(ExperimentStateLog.scheduler_entry(self._scheduler.get_state()))
        pop = getattr(self._scheduler, "pop_state_updates", None)
        ops = pop() if pop is not None else None
        if ops:
            entries.append(ExperimentStateLog.scheduler_update_entry(ops))
        return entries

    def _log_scheduler(self) -> None:
        """Append the scheduler's changes to every experiment's log, now."""
        self._log_trials(None, [])

    def _log_trial(self, trial: Trial) -> None:
        self._log_trials(trial.experiment_path, [trial])

    def _log_trials(self, experiment_path: str | None, trials: list[Trial]) -> None:
        """Append the records of `trials` (all of one experiment) to its log,
        after the scheduler's changes and, if it changed, the experiment's
        search state, in one write: a trial line is never on disk without the
        state that made it. Other experiments' logs get the scheduler's lines."""
        scheduler = self._scheduler_entries()
        for path, log in self._logs.items():
            entries = list(scheduler)
            if path == experiment_path:
                if path in self._search_dirty:
                    self._search_dirty.discard(path)
                    entries.extend(self._search_entry(trials[0]._experiment))
                entries.extend(ExperimentStateLog.trial_entry(t) for t in trials)
            if not entries:
                continue
            try:
                log.append(entries)
            except OSError as err:
                warnings.warn(f"could not log the experiment's state in {path}: {err}; "
                              f"resume may rerun trials or decide differently", stacklevel=2)

    def _search_entry(self, exp) -> list[dict]:
        if exp is None:
            return []
        try:
            return [ExperimentStateLog.search_entry(exp.search_state())]
        except Exception as err:  # noqa: BLE001 - e.g. a searcher that cannot be pickled
            if exp.path not in self._warned_search:
                self._warned_search.add(exp.path)
                warnings.warn(f"could not save the search state of {exp.name}: {err}; "
                              f"resume will start the search over", stacklevel=2)
            return []

    def _save_state(self, experiment_path: str) -> None:
        """Write ``experiment_state.json``, the final table of trials that
        ExperimentAnalysis reads (while running, the log is the state)."""
        trials = [t for t in self._trials if t.experiment_path == experiment_path]
        state = {"experiment_path": experiment_path, "timestamp": time.time(),
                 "trials": [t.to_record() for t in trials]}
        path = os.path.join(experiment_path, "experiment_state.json")
        tmp = path + ".tmp"
        try:
            with open(tmp, "w") as f:
                f.write(json.dumps(state, default=json_default))  # (dump: no C encoder)
            os.replace(tmp, path)
        except OSError:  # a convenience; results are in the trial dirs and the log
            pass
