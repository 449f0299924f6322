"""The threads the Ray backend starts in a process, and the rule they keep:
none of them ever starts a Ray.

Ray's API (``ray.get``, ``ray.wait``, ``get_actor``, an actor method's
``.remote()``...) starts a local Ray when it is called in a process that is
not connected to one (Ray's auto-init). A call from one of beamlet's
background threads made just after the program's ``ray.shutdown()`` (a
user's own, or the backend's) would start one in the program's process,
unasked. Worse, that Ray's processes belong to the thread: Linux's
parent-death signal, which Ray sets on them, follows the thread that started
them, so when the thread ends they die, and about 60 s later Ray's client,
still connected to them, ends the whole process with ``exit(1)`` (from its
task-event thread). That is how a pytest-xdist worker died with no trace.

So on the threads made by `start` (the Ray backend's own: what runs there,
observer plugins and subscribers' callbacks included), a Ray call made while
this process is not connected raises `RayNotConnected` instead of starting a
Ray; anywhere else Ray behaves as Ray does. (Code of other backends must not
call Ray at all: see ``events._job_id``.) It works by wrapping Ray 2.60's auto-init
function where Ray's wrappers look it up (`_install`), which
tests/test_ray_backend.py checks against the installed Ray.
"""
from __future__ import annotations

import importlib
import threading
from typing import Callable

import ray as _ray

from ... import exceptions as exc

_here = threading.local()

#: The modules whose ``auto_init_ray`` Ray's API calls: the wrappers of
#: ``ray.get`` & co., actor methods and ``list_named_actors`` look it up in the
#: first; the placement-group functions (``client_mode_wrap``) and
#: ``get_current_placement_group`` imported it by name.
_AUTO_INIT_MODULES = ("ray._private.auto_init_hook", "ray._private.client_mode_hook",
                      "ray.util.placement_group")


class RayNotConnected(exc.BackendError):
    """A Ray call on one of beamlet's threads while this process is not
    connected to Ray (never, or no longer): Ray would have started one."""


def start(target: Callable, *args, name: str) -> threading.Thread:
    """Start a daemon thread `name` running ``target(*args)``, on which Ray's
    API raises `RayNotConnected` rather than start a Ray."""
    thread = threading.Thread(target=_run, args=(target, args), name=name, daemon=True)
    thread.start()
    return thread


def _run(target: Callable, args: tuple) -> None:
    _here.no_auto_init = True
    target(*args)


def _guarded(auto_init_ray: Callable) -> Callable:
    def guarded_auto_init_ray():
        if getattr(_here, "no_auto_init", False) and not _ray.is_initialized():
            raise RayNotConnected(f"this process is not connected to Ray (never, or no longer): "
                                  f"beamlet's thread {threading.current_thread().name!r} "
                                  f"does not start a Ray")
        return auto_init_ray()
    guarded_auto_init_ray.beamlet_guard = True
    return guarded_auto_init_ray


def _install() -> None:
    for name in _AUTO_INIT_MODULES:
        module = importlib.import_module(name)
        current = module.auto_init_ray
        if not getattr(current, "beamlet_guard", False):
            module.auto_init_ray = _guarded(current)


_install()
