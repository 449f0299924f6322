"""An actor that calls ``exit_actor()`` (or is sent ``__ray_terminate__``) ends
gracefully, as in Ray: the call and those queued behind it fail with
ActorDiedError saying the actor called exit_actor() (not that it was killed),
the actor is not restarted, its ``__ray_shutdown__`` runs and, where it has a
process of its own, so do its atexit handlers. ``kill()`` stays a kill."""
from __future__ import annotations

import asyncio
import atexit
import os

import pytest

import beamlet as ray
from beamlet.core import runtime as _runtime

T = 30


def _mark(directory: str, name: str) -> None:
    with open(os.path.join(directory, name), "w") as f:
        f.write(name)


@ray.remote(max_restarts=2)
class Service:
    def __init__(self, directory):
        self.directory = directory
        atexit.register(_mark, directory, f"atexit-{os.getpid()}")

    def __ray_shutdown__(self):
        _mark(self.directory, "shutdown")

    def work(self):
        return os.getpid()

    def leave(self):
        ray.actor.exit_actor()
        return "not reached"


def _ended(directory) -> list[str]:
    return sorted(n.split("-")[0] for n in os.listdir(directory))


def test_exit_actor_fails_the_queued_calls_and_runs_the_shutdown_hooks(backend, tmp_path):
    service = Service.remote(str(tmp_path))
    pid = ray.get(service.work.remote(), timeout=T)
    leaving = service.leave.remote()
    queued = [service.work.remote() for _ in range(3)]
    for ref in [leaving] + queued:
        with pytest.raises(ray.exceptions.ActorDiedError, match="exit_actor()") as info:
            ray.get(ref, timeout=T)
        assert "kill" not in str(info.value)
    # Not restarted (max_restarts=2 is for crashes): later calls fail the same way.
    with pytest.raises(ray.exceptions.ActorDiedError, match="exit_actor()"):
        ray.get(service.work.remote(), timeout=T)
    _wait_for_file(tmp_path, "shutdown")
    if backend.isolated and backend.manages_workers:  # (on dask it shares a Dask worker)
        _wait_for_file(tmp_path, f"atexit-{pid}")


def _wait_for_file(directory, name) -> None:
    """The actor's process writes it as it ends, after its calls were failed."""
    import time
    until = time.monotonic() + T
    while not os.path.exists(os.path.join(directory, name)):
        assert time.monotonic() < until, f"{name} never appeared in {os.listdir(directory)}"
        time.sleep(0.02)


def test_ray_terminate_ends_the_actor_gracefully_after_earlier_calls(backend, tmp_path):
    service = Service.remote(str(tmp_path))
    before = [service.work.remote() for _ in range(3)]
    ending = service.__ray_terminate__.remote()
    assert len(set(ray.get(before, timeout=T))) == 1
    with pytest.raises(ray.exceptions.ActorDiedError, match="exit_actor()"):
        ray.get(ending, timeout=T)
    with pytest.raises(ray.exceptions.ActorDiedError, match="exit_actor()"):
        ray.get(service.work.remote(), timeout=T)
    _wait_for_file(tmp_path, "shutdown")


def test_exit_actor_from_an_awaited_async_method(backend, tmp_path):
    @ray.remote
    class AsyncService:
        def __init__(self, directory):
            self.directory = directory

        def __ray_shutdown__(self):
            _mark(self.directory, "shutdown")

        async def ping(self):
            return "pong"

        async def leave(self):
            await asyncio.sleep(0)
            try:
                ray.actor.exit_actor()
            except ray.exceptions.AsyncioActorExit:
                raise  # (Ray's type: code may see it pass)

    service = AsyncService.remote(str(tmp_path))
    assert ray.get(service.ping.remote(), timeout=T) == "pong"
    with pytest.raises(ray.exceptions.ActorDiedError, match="exit_actor()"):
        ray.get(service.leave.remote(), timeout=T)
    with pytest.raises(ray.exceptions.ActorDiedError, match="exit_actor()"):
        ray.get(service.ping.remote(), timeout=T)
    _wait_for_file(tmp_path, "shutdown")


def test_exit_actor_in_a_threaded_actor(backend, tmp_path):
    service = Service.options(max_concurrency=2).remote(str(tmp_path))
    with pytest.raises(ray.exceptions.ActorDiedError, match="exit_actor()"):
        ray.get(service.leave.remote(), timeout=T)
    with pytest.raises(ray.exceptions.ActorDiedError, match="exit_actor()"):
        ray.get(service.work.remote(), timeout=T)
    _wait_for_file(tmp_path, "shutdown")


@ray.remote
class Streamer:
    def __init__(self, directory):
        self.directory = directory

    def __ray_shutdown__(self):
        _mark(self.directory, "shutdown")

    def work(self, name):
        _mark(self.directory, name)
        return os.getpid()

    def leave(self):
        yield 1
        ray.actor.exit_actor()


@ray.remote
class AsyncStreamer:
    def __init__(self, directory):
        self.directory = directory

    def __ray_shutdown__(self):
        _mark(self.directory, "shutdown")

    async def work(self, name):
        _mark(self.directory, name)
        return os.getpid()

    async def leave(self):
        yield 1
        ray.actor.exit_actor()


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_exit_actor_from_a_generator_method(backend, tmp_path, kind):
    # (On ray the generator's call did not end the actor: the next plain call
    # ran, then ended it; with its method called before, and nobody told of
    # the ends of tasks, the actor lived on, its plain calls answering.)
    if not _runtime.current().backend.streaming_generators:
        pytest.skip(f"the {backend.name!r} backend does not run generator tasks "
                    f"(its streaming_generators flag is off)")
    service = (Streamer if kind == "sync" else AsyncStreamer).remote(str(tmp_path))
    assert len(set(ray.get([service.work.remote(f"before{i}") for i in range(3)],
                           timeout=T))) == 1
    items = service.leave.remote()
    # (An async actor's calls run at once, concurrently: none waits behind another.)
    queued = [service.work.remote(f"queued{i}") for i in range(3)] if kind == "sync" else []
    with pytest.raises(ray.exceptions.ActorDiedError, match="exit_actor()"):
        for ref in items:
            ray.get(ref, timeout=T)
    for ref in queued + [service.work.remote("after")]:
        with pytest.raises(ray.exceptions.ActorDiedError, match="exit_actor()"):
            ray.get(ref, timeout=T)
    _wait_for_file(tmp_path, "shutdown")
    assert _ended(tmp_path) == ["before0", "before1", "before2", "shutdown"]


def test_kill_is_still_a_kill(backend, tmp_path):
    service = Service.remote(str(tmp_path))
    ray.get(service.work.remote(), timeout=T)
    ray.kill(service)
    with pytest.raises(ray.exceptions.ActorDiedError, match="kill"):
        ray.get(service.work.remote(), timeout=T)
    assert "shutdown" not in _ended(tmp_path)


def test_exit_actor_outside_an_actor_raises_type_error(backend):
    with pytest.raises(TypeError, match="inside an actor"):
        ray.actor.exit_actor()
