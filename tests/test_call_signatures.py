"""Wrong arguments are caught at ``.remote()``, as in Ray: the signature of a
task, an actor's constructor or a method is bound in the caller, and a call
that does not bind raises TypeError there, before anything is submitted."""
from __future__ import annotations

import functools

import pytest

import beamlet as ray

T = 30


@ray.remote
def add(a, b=1, *, scale=1):
    return (a + b) * scale


@ray.remote
def anything(*args, **kwargs):
    return len(args), sorted(kwargs)


@ray.remote
class Account:
    LIMIT = 10

    def __init__(self, owner, balance=0):
        self.owner, self.balance = owner, balance

    def deposit(self, amount, *, note=""):
        self.balance += amount
        return self.balance

    @staticmethod
    def fee(amount):
        return amount // 10

    @classmethod
    def kind(cls, x):
        return x

    def spread(self, *amounts):
        return sum(amounts)


def test_task_with_wrong_arguments_raises_type_error_at_remote(backend):
    with pytest.raises(TypeError, match="add.*missing a required argument: 'a'"):
        add.remote()
    with pytest.raises(TypeError, match="too many positional arguments"):
        add.remote(1, 2, 3)
    with pytest.raises(TypeError, match="unexpected keyword argument 'nope'"):
        add.remote(1, nope=2)
    with pytest.raises(TypeError):
        add.options(num_cpus=1).remote(1, 2, 3)
    assert ray.get([add.remote(1), add.remote(1, 2, scale=3), add.remote(a=2, b=2)],
                   timeout=T) == [2, 9, 4]
    assert ray.get(anything.remote(1, 2, x=3), timeout=T) == (2, ["x"])


def test_a_ref_counts_as_an_argument(backend):
    assert ray.get(add.remote(ray.put(4), b=ray.put(1)), timeout=T) == 5
    with pytest.raises(TypeError):
        add.remote(ray.put(1), ray.put(2), ray.put(3))


def test_wrapped_functions_are_checked_against_what_they_wrap(backend):
    def logged(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            return fn(*args, **kwargs)
        return wrapper

    @ray.remote
    @logged
    def one(x):
        return x

    assert ray.get(one.remote(3), timeout=T) == 3
    with pytest.raises(TypeError):
        one.remote(1, 2)


def test_actor_constructor_with_wrong_arguments_raises_type_error(backend):
    with pytest.raises(TypeError, match="Account.*missing a required argument: 'owner'"):
        Account.remote()
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        Account.options(name=None).remote("x", colour="red")

    @ray.remote
    class Plain:
        def ping(self):
            return 1

    with pytest.raises(TypeError):
        Plain.remote(1)
    assert ray.get(Plain.remote().ping.remote(), timeout=T) == 1


def test_actor_method_with_wrong_arguments_raises_type_error(backend):
    account = Account.remote("ann", balance=5)
    with pytest.raises(TypeError, match="Account.deposit.*missing a required argument"):
        account.deposit.remote()
    with pytest.raises(TypeError, match="unexpected keyword argument 'memo'"):
        account.deposit.remote(1, memo="x")
    with pytest.raises(TypeError):
        account.deposit.options(num_returns=1).remote(1, 2)
    with pytest.raises(TypeError):
        account.fee.remote()
    assert ray.get(account.deposit.remote(5, note="pay"), timeout=T) == 10
    assert ray.get(account.fee.remote(50), timeout=T) == 5
    assert ray.get(account.kind.remote(7), timeout=T) == 7
    assert ray.get(account.spread.remote(1, 2, 3), timeout=T) == 6
    assert ray.get(account.__ray_ready__.remote(), timeout=T) is True


def test_handles_passed_to_tasks_check_arguments_too(backend):
    account = Account.remote("bob")

    @ray.remote
    def misuse(handle):
        try:
            handle.deposit.remote(1, 2)
        except TypeError as err:
            return str(err)
        return "accepted"

    assert "too many positional arguments" in ray.get(misuse.remote(account), timeout=T)
