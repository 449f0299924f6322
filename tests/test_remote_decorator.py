"""The ways ``@remote`` may and may not be applied, as in Ray: bare or with
options; not with empty parentheses, not on an ``async def`` function."""
from __future__ import annotations

import pytest

import beamlet as ray

T = 30


def test_remote_with_empty_parentheses_raises_as_ray_does(backend):
    with pytest.raises(AssertionError, match="no arguments and no parentheses"):
        @ray.remote()
        def f():
            return 1
    with pytest.raises(AssertionError) as raised:
        ray.remote()
    assert type(raised.value) is AssertionError  # (Ray's own type: programs print its name)


def test_remote_on_an_async_function_raises_value_error(backend):
    with pytest.raises(ValueError, match="'async def' cannot be a remote task"):
        @ray.remote
        async def f():
            return 1

    with pytest.raises(ValueError, match="async def"):
        @ray.remote(num_cpus=1)
        async def g():
            return 1


def test_remote_bare_and_with_options(backend):
    @ray.remote
    def bare():
        return 1

    @ray.remote(num_cpus=1)
    def with_options():
        return 2

    @ray.remote
    class Actor:
        async def ping(self):  # async methods belong in actors
            return 3

    assert ray.get([bare.remote(), with_options.remote(), Actor.remote().ping.remote()],
                   timeout=T) == [1, 2, 3]
