"""A failed task's error that nobody `get`s is not silent: when the last ref to
it is dropped unread, the driver logs it once ("Unhandled error", as Ray
prints); an error that `get` raised is not logged again."""
from __future__ import annotations

import gc
import logging

import beamlet as ray

T = 30


@ray.remote
def fail(text):
    raise ValueError(text)


def _unhandled(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "Unhandled error" in r.getMessage()]


def test_an_error_dropped_unread_is_logged_once(backend, caplog):
    with caplog.at_level(logging.ERROR, logger="beamlet"):
        ref = fail.remote("nobody looked")
        assert ray.wait([ref], timeout=T)[0] == [ref]
        del ref
        gc.collect()
    messages = _unhandled(caplog)
    assert len(messages) == 1 and "nobody looked" in messages[0]


def test_an_error_get_raised_is_not_logged(backend, caplog):
    with caplog.at_level(logging.ERROR, logger="beamlet"):
        ref = fail.remote("seen")
        try:
            ray.get(ref, timeout=T)
        except ValueError:
            pass
        refs = [fail.remote("seen in a list"), ray.put(1)]
        try:
            ray.get(refs, timeout=T)
        except ValueError:
            pass
        del ref, refs
        gc.collect()
        ok = ray.put("fine")
        del ok
    assert _unhandled(caplog) == []
