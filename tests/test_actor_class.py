"""What an actor class (the result of ``@remote`` on a class) offers besides
``.remote()``: its class attributes, static and class methods through the
decorated name, inside the actor's methods too (as in Ray); subclassing it is a
clear TypeError."""
from __future__ import annotations

import pytest

import beamlet as ray

T = 30


@ray.remote
class Counter:
    LIMIT = 5

    @staticmethod
    def helper(v):
        return v + 1

    @classmethod
    def twice(cls, v):
        return 2 * v

    def report(self):
        return Counter.LIMIT, Counter.helper(1), Counter.twice(3)


def test_class_attributes_and_static_methods_through_the_decorated_class(backend):
    assert Counter.LIMIT == 5 and Counter.helper(2) == 3 and Counter.twice(2) == 4
    assert ray.get(Counter.remote().report.remote(), timeout=T) == (5, 2, 6)
    with pytest.raises(AttributeError, match="nothing_here"):
        Counter.nothing_here
    with pytest.raises(AttributeError, match=r"'report' is a method of the actor class Counter"):
        Counter.report


def test_a_class_defined_in_a_function_reaches_itself_too(backend):
    @ray.remote
    class Local:
        SCALE = 3

        @staticmethod
        def scale(v):
            return v * Local.SCALE

        def run(self, v):
            return Local.scale(v)

    assert ray.get(Local.remote().run.remote(2), timeout=T) == 6


def test_subclassing_an_actor_class_is_a_clear_error(backend):
    with pytest.raises(TypeError, match="cannot subclass the actor class Counter"):
        class Sub(Counter):  # noqa: F841
            pass

    class Base:
        def value(self):
            return 1

    @ray.remote
    class Derived(Base):  # the supported way: subclass the plain class
        pass

    assert ray.get(Derived.remote().value.remote(), timeout=T) == 1
