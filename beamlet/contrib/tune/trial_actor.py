"""The code that runs one trial inside a beamlet actor.

The driver creates one :class:`TrialActor` per trial (with the trial's
resources) and calls ``step()`` repeatedly: each call returns the next event
of the trial, a dict with ``kind``:

* ``"result"``: ``event["result"]`` is the next result (``done`` set when the
  trial ended with it: a stop criterion was met, or the trainable returned it);
* ``"done"``: the trainable returned without a final result;
* ``"error"``: the trainable (or its setup) raised; ``event["error"]`` is the
  traceback text.

After a non-final result the trainable waits for the driver: the next
``step()`` lets it continue, ``stop()`` ends it. This is what lets a
scheduler decide CONTINUE / PAUSE / STOP on every result. ``step()`` never
raises for the trainable's own failures.

With the option ``run_ahead`` (the driver will answer every result that
does not end the trial with "continue": no scheduler or stopper of its
decides per result) the trainable does not wait, and ``step()`` returns
``{"kind": "batch", "events": [...]}``: the events that are there (at
least one, in order, the trial's last event last), one round trip for many
results. The trial still ends exactly where it should: the dict stop
criteria and ``done`` are applied in the trial itself. What it costs (as
Ray Tune's result buffering): if the trial's process dies (a segfault,
``os._exit``, the OOM killer), the results it reported since its last batch
went out die with it; a trial that waits for the driver loses none.
"""
from __future__ import annotations

import contextvars
import os
import queue
import threading
import time
import traceback

from .session import StatusReporter, StopTrial, TrialSession
from .stopper import criteria_met
from .trainable import Trainable, wants_reporter

__all__ = ["TrialActor"]

_JOIN_TIMEOUT_S = 10.0
#: The most events one batch (``run_ahead``) holds.
_MAX_BATCH = 256
#: A class trainable that runs ahead goes on with ``train()`` within one
#: ``step()`` for about this long (a slow ``train()`` is one result per step).
_CLASS_BATCH_S = 0.02


def _is_last(event: dict) -> bool:
    """Whether `event` is the trial's last (its trainable has ended)."""
    return event["kind"] != "result" or bool(event["result"].get("done"))


_TUNE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _error_event(err: BaseException) -> dict:
    # The traceback starts at the user's code, not at the frames that called it.
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None and \
            tb.tb_frame.f_code.co_filename.startswith(_TUNE_DIR):
        tb = tb.tb_next
    text = "".join(traceback.format_exception(type(err), err, tb))
    return {"kind": "error", "error": text, "error_type": type(err).__name__,
            "message": str(err)}


_to_create: queue.SimpleQueue | None = None


def _prepare_dir(logdir: str, files) -> None:
    """Make the trial's directory and (on a thread of this process, so that
    the trial need not wait for it) the files the driver's loggers will write
    there, empty (see BackgroundLoggers.trial_files): creating a file costs
    the kernel more than opening it, and this process runs beside the driver."""
    global _to_create
    os.makedirs(logdir, exist_ok=True)
    if files:
        if _to_create is None:
            _to_create = queue.SimpleQueue()
            threading.Thread(target=_create_files, args=(_to_create,), daemon=True,
                             name="beamlet-tune-files").start()
        _to_create.put([os.path.join(logdir, name) for name in files])


def _create_files(paths_queue: queue.SimpleQueue) -> None:
    while True:
        for path in paths_queue.get():
            try:  # (never truncating: the loggers may have written to it first)
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644))
            except OSError:  # (the logger creates it then)
                pass


_last_signature: tuple = (None, False)  # (a trainable, wants_reporter of it)


def _wants_reporter(fn) -> bool:
    """wants_reporter(fn), not computed again for the trainable of the
    previous trial (an actor that is reused runs the same one)."""
    global _last_signature
    last, value = _last_signature
    if fn is not last:
        value = wants_reporter(fn)
        _last_signature = (fn, value)
    return value


class _FunctionRunner:
    """Runs a function trainable in a thread; each report is one step."""

    def __init__(self, fn, config: dict, trial_info: dict, stop_criteria: dict,
                 options: dict):
        self._fn = fn
        self._config = config
        self._session = TrialSession(trial_info, config, stop_criteria, options.get("restore"),
                                     run_ahead=bool(options.get("run_ahead")))
        self._pass_reporter = _wants_reporter(fn)
        self._thread: threading.Thread | None = None
        self._ended = False

    def _main(self) -> None:
        session = self._session
        session.activate()
        try:
            if self._pass_reporter:
                value = self._fn(self._config, StatusReporter(session))
            else:
                value = self._fn(self._config)
            if isinstance(value, dict) and not session.stop_requested:
                session.report(value, final=True)
            session.events.put({"kind": "done"})
        except StopTrial:
            pass
        except BaseException as err:  # noqa: BLE001 - the trial reports any failure
            if not session.stop_requested:
                session.events.put(_error_event(err))
        finally:
            session.deactivate()

    def step(self) -> dict:
        if self._ended:
            return {"kind": "done"}
        if self._thread is None:
            # The thread runs in a copy of this call's context, so the trainable
            # sees the actor's task context (get_runtime_context()).
            ctx = contextvars.copy_context()
            self._thread = threading.Thread(target=ctx.run, args=(self._main,), daemon=True,
                                            name=f"beamlet-tune-{self._session.trial_id}")
            self._thread.start()
        elif self._session.room is None:
            self._session.resume()
        event = self._next_event()
        room = self._session.room
        if room is not None:
            return self._batch(event, room)
        if _is_last(event):
            self._ended = True
            self._thread.join(_JOIN_TIMEOUT_S)
        return event

    def _batch(self, event: dict, room) -> dict:
        """`event` and those queued after it, each result giving its room back."""
        events, get = [event], self._session.events.get_nowait
        while not _is_last(event) and len(events) < _MAX_BATCH:
            try:
                event = get()
            except queue.Empty:
                break
            events.append(event)
        results = sum(1 for e in events if e["kind"] == "result")
        if results:
            room.release(results)
        if _is_last(event):
            self._ended = True
            self._thread.join(_JOIN_TIMEOUT_S)
        return {"kind": "batch", "events": events}

    def _next_event(self) -> dict:
        events = self._session.events
        while True:
            try:
                return events.get(timeout=0.5)
            except queue.Empty:
                if not self._thread.is_alive():
                    try:
                        return events.get_nowait()
                    except queue.Empty:
                        return {"kind": "error", "error": "the trainable's thread ended "
                                "without reporting", "error_type": "RuntimeError",
                                "message": "the trainable's thread ended without reporting"}

    def save(self) -> str | None:
        """A function trainable checkpoints only when it reports one: its latest."""
        checkpoint = self._session.checkpoint
        return checkpoint.path if checkpoint is not None else None

    def stop(self, save: bool = False) -> str | None:
        self._ended = True
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._session.request_stop()
            thread.join(_JOIN_TIMEOUT_S)
        return self.save() if save else None


class _ClassRunner:
    """Runs a Trainable subclass: one ``train()`` per step."""

    def __init__(self, cls, config: dict, trial_info: dict, stop_criteria: dict,
                 options: dict):
        self._trainable = cls(config, trial_info=trial_info)
        if options.get("restore"):
            self._trainable.restore(options["restore"])
        self._stop_criteria = stop_criteria
        self._freq = options.get("checkpoint_freq") or 0
        self._at_end = bool(options.get("checkpoint_at_end"))
        self._run_ahead = bool(options.get("run_ahead"))
        self._ended = False

    def step(self) -> dict:
        if not self._run_ahead:
            return self._step()
        deadline = time.monotonic() + _CLASS_BATCH_S
        events = [self._step()]
        while not _is_last(events[-1]) and len(events) < _MAX_BATCH and \
                time.monotonic() < deadline:
            events.append(self._step())
        return {"kind": "batch", "events": events}

    def _step(self) -> dict:
        if self._ended:
            return {"kind": "done"}
        try:
            result = self._trainable.train()
        except BaseException as err:  # noqa: BLE001
            self._close()  # no checkpoint_at_end: the state may be broken
            return _error_event(err)
        if criteria_met(self._stop_criteria, result):
            result["done"] = True
        event = {"kind": "result", "result": result}
        try:
            if (self._freq and result["training_iteration"] % self._freq == 0) or \
                    (result["done"] and self._at_end):
                event["checkpoint"] = self._trainable.save()
            if result["done"]:
                self._close()
        except BaseException as err:  # noqa: BLE001
            self._close()
            return _error_event(err)
        return event

    def save(self) -> str | None:
        if self._ended or not self._trainable.can_checkpoint():
            return None
        return self._trainable.save()

    def stop(self, save: bool = False) -> str | None:
        path = None
        if not self._ended and (save or self._at_end):
            path = self.save()
        self._close()
        return path

    def _close(self) -> None:
        if not self._ended:
            self._ended = True
            self._trainable.stop()


class TrialActor:
    """One trial, as the body of a beamlet actor (see the module docstring)."""

    def __init__(self, trainable, config: dict, trial_info: dict, stop_criteria: dict,
                 options: dict | None = None):
        """``options``: ``restore`` (a checkpoint directory to start from),
        ``checkpoint_freq``, ``checkpoint_at_end`` (class trainables)."""
        self._error: dict | None = None
        self._runner = None
        self._trainable = trainable
        options = options or {}
        try:
            if trial_info.get("logdir"):  # (the driver leaves it to the trial: see runner)
                _prepare_dir(trial_info["logdir"], trial_info.get("log_files") or ())
            if isinstance(trainable, type) and issubclass(trainable, Trainable):
                self._runner = _ClassRunner(trainable, config, trial_info, stop_criteria,
                                            options)
            else:
                self._runner = _FunctionRunner(trainable, config, trial_info, stop_criteria,
                                               options)
        except BaseException as err:  # noqa: BLE001 - reported by the first step()
            self._error = _error_event(err)

    def reset(self, trainable, config: dict, trial_info: dict, stop_criteria: dict,
              options: dict | None = None) -> bool:
        """Run another trial in this actor (``reuse_actors``): the previous one has
        ended; the new one starts as in a fresh actor, without a new process."""
        if self._runner is not None:
            self._runner.stop()
        self.__init__(trainable, config, trial_info, stop_criteria, options)
        return True

    def reset_and_step(self, trainable, arguments: dict) -> dict:
        """:meth:`reset` (with `arguments`: ``config``, ``trial_info``,
        ``stop_criteria``, ``options``) then :meth:`step`: a reused actor starts
        its next trial in one call, its arguments serialized as one.
        `trainable` None: the one of the previous trial (not sent again)."""
        self.reset(self._trainable if trainable is None else trainable, **arguments)
        return self.step()

    def step(self) -> dict:
        if self._error is not None:
            error, self._error = self._error, None
            self._runner = None
            return error
        if self._runner is None:
            return {"kind": "done"}
        return self._runner.step()

    def save(self) -> str | None:
        """A checkpoint of the trial now (between steps), or None if it cannot make one."""
        return self._runner.save() if self._runner is not None else None

    def stop(self, save: bool = False) -> str | None:
        """End the trial; with `save` (or checkpoint_at_end) return a last checkpoint."""
        if self._runner is not None:
            return self._runner.stop(save)
        return None
