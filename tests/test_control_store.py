"""The control store (the GCS) and the tables beamlet keeps in it.

`compare_and_set` is the store's one atomic read-modify-write; the tables of
``core/tables.py`` build every update on it. The semantic tests run against
each store in ``STORE_FACTORIES`` (the in-memory one, and the Redis one on the
module's own redis-server: a machine without redis-server fails those tests,
saying how to install it), the concurrency tests from many threads at once
with a fine thread switch interval so that reads and writes interleave.
The last tests go through the local backend's workers, whose control store is
the driver's, reached by requests. What only Redis does (passwords, restarts,
the server process) is tested in test_redis.py.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import secrets
import sys
import threading

import pytest

import beamlet as ray
from beamlet import exceptions as exc
from beamlet.core import ids
from beamlet.core.control_store import MemoryControlStore
from beamlet.core.interfaces import ControlStore
from beamlet.core.tables import (MAX_ATTEMPTS, NAMED_ACTORS, ActorInfo, ActorState, NodeState,
                                 Tables, named_actor_key)

THREADS = 16
JOIN_TIMEOUT = 120


def _memory_store(request) -> ControlStore:
    return MemoryControlStore()


def _redis_store(request) -> ControlStore:
    """A store on the module's redis-server, in a namespace no other test uses."""
    from beamlet.backends.redis.control_store import RedisControlStore
    server = request.getfixturevalue("redis_server")
    return RedisControlStore(server.url, namespace=f"test-{secrets.token_hex(8)}")


def _dask_store(request) -> ControlStore:
    """A store in the scheduler of the tests' shared Dask cluster, in a table
    namespace no other test uses (tables there last as long as the scheduler)."""
    from conftest import _dask_cluster

    from beamlet.backends.dask.control import DaskControlStore
    client = _dask_cluster.client()
    request.addfinalizer(client.close)
    return DaskControlStore(client, root=f"test-{secrets.token_hex(8)}")


#: name -> ``factory(request)`` of an empty store. A store that needs a server
#: gets it through a fixture (``request.getfixturevalue``), which fails its tests
#: when the server cannot run here.
STORE_FACTORIES = {"memory": _memory_store, "redis": _redis_store, "dask": _dask_store}


@pytest.fixture(params=sorted(STORE_FACTORIES))
def store(request):
    s = STORE_FACTORIES[request.param](request)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def tables(store) -> Tables:
    return Tables(store)


@contextlib.contextmanager
def _interleaved():
    """Switch threads as often as possible, so that one thread's read and
    write are likely to have other threads' writes between them."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


def _in_threads(n: int, work) -> list:
    """Run ``work(i)`` for i in range(n), each in its own thread, all released at
    once. Returns each result, or the exception it raised."""
    barrier = threading.Barrier(n, timeout=JOIN_TIMEOUT)
    results: list = [None] * n

    def run(i):
        try:
            barrier.wait()
            results[i] = work(i)
        except BaseException as err:  # noqa: BLE001 - handed to the test
            results[i] = err

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    with _interleaved():
        for t in threads:
            t.start()
        for t in threads:
            t.join(JOIN_TIMEOUT)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    return results


def _actor(name: str | None = "counter", namespace: str = "ns") -> ActorInfo:
    return ActorInfo(ids.new_id(), "Counter", name, namespace, ids.new_id(),
                     {"incr": {"num_returns": 1, "is_async": False}})


# -- compare-and-set ---------------------------------------------------------------
def test_compare_and_set_inserts_only_if_absent(store):
    assert store.compare_and_set("t", b"k", None, b"first")
    assert not store.compare_and_set("t", b"k", None, b"second")
    assert store.get("t", b"k") == b"first"


def test_compare_and_set_replaces_only_the_expected_value(store):
    store.put("t", b"k", b"v1")
    assert not store.compare_and_set("t", b"k", b"other", b"v2")
    assert store.get("t", b"k") == b"v1"
    assert store.compare_and_set("t", b"k", b"v1", b"v2")
    assert store.get("t", b"k") == b"v2"
    assert not store.compare_and_set("t", b"absent", b"v1", b"v2")
    assert store.get("t", b"absent") is None


def test_compare_and_set_deletes_only_the_expected_value(store):
    store.put("t", b"k", b"v")
    assert not store.compare_and_set("t", b"k", b"other", None)
    assert store.keys("t") == [b"k"]
    assert store.compare_and_set("t", b"k", b"v", None)
    assert store.get("t", b"k") is None and store.keys("t") == []
    # Expecting absence and asking for absence: true exactly when it is absent.
    assert store.compare_and_set("t", b"k", None, None)
    store.put("t", b"k", b"v")
    assert not store.compare_and_set("t", b"k", None, None)


def test_a_str_key_is_its_utf8_encoding(store):
    store.put("t", "clé", b"v")
    assert store.get("t", "clé".encode()) == b"v"
    assert store.compare_and_set("t", "clé".encode(), b"v", b"w")
    assert store.get("t", "clé") == b"w"
    assert store.keys("t") == ["clé".encode()]


def test_put_without_overwrite_is_insert_if_absent(store):
    assert store.put("t", b"k", b"a", overwrite=False)
    assert not store.put("t", b"k", b"b", overwrite=False)
    assert store.put("t", b"k", b"c")
    assert store.get("t", b"k") == b"c"


def test_keys_and_values_must_be_bytes(store):
    with pytest.raises(TypeError, match="key must be str or bytes"):
        store.compare_and_set("t", 5, None, b"v")
    with pytest.raises(TypeError, match="new value must be bytes"):
        store.compare_and_set("t", b"k", None, "text")
    with pytest.raises(TypeError, match="value must be bytes"):
        store.put("t", b"k", None)


def test_compare_and_set_counter_from_many_threads_loses_no_increment(store):
    increments = 30  # (16 threads contend on every one: enough to lose some if CAS were not atomic)

    def count(_):
        for _ in range(increments):
            while True:
                old = store.get("t", b"n")
                new = str(int(old or b"0") + 1).encode()
                if store.compare_and_set("t", b"n", old, new):
                    break

    assert _in_threads(THREADS, count) == [None] * THREADS
    assert store.get("t", b"n") == str(THREADS * increments).encode()


# -- publish and subscribe -----------------------------------------------------------
class _Inbox:
    """Collects what a subscriber is called with, from whichever thread calls it."""

    def __init__(self):
        self.messages: list[bytes] = []
        self._cond = threading.Condition()

    def __call__(self, message: bytes) -> None:
        with self._cond:
            self.messages.append(message)
            self._cond.notify_all()

    def wait_for(self, count: int) -> list[bytes]:
        """The messages, once there are at least `count` (fails after JOIN_TIMEOUT s)."""
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.messages) >= count, JOIN_TIMEOUT), \
                f"{len(self.messages)} of {count} messages arrived: {self.messages}"
            return list(self.messages)


def test_subscribers_get_every_later_message_in_order(store):
    store.publish("news", b"before anyone listened")
    first, second = _Inbox(), _Inbox()
    store.subscribe("news", first)
    store.subscribe("news", second)
    sent = [b"%d" % i for i in range(50)]
    for message in sent:
        store.publish("news", message)
    assert first.wait_for(50) == sent
    assert second.wait_for(50) == sent


def test_channels_are_separate_and_unsubscribe_stops_delivery(store):
    gone, stays, elsewhere = _Inbox(), _Inbox(), _Inbox()
    unsubscribe = store.subscribe("a", gone)
    store.subscribe("a", stays)
    store.subscribe("b", elsewhere)
    store.publish("a", b"1")
    assert stays.wait_for(1) == [b"1"] and gone.wait_for(1) == [b"1"]
    unsubscribe()
    unsubscribe()  # a second call changes nothing
    store.publish("a", b"2")
    store.publish("b", b"for b")
    # Subscribers of a channel are called in the order they subscribed: `gone`
    # would have had b"2" before `stays` did.
    assert stays.wait_for(2) == [b"1", b"2"]
    assert gone.messages == [b"1"]
    assert elsewhere.wait_for(1) == [b"for b"]


def test_a_subscriber_that_raises_does_not_stop_the_others(store, capfd):
    def broken(message):
        raise RuntimeError("subscriber bug")

    inbox = _Inbox()
    store.subscribe("c", broken)
    store.subscribe("c", inbox)
    store.publish("c", b"x")
    store.publish("c", b"y")
    assert inbox.wait_for(2) == [b"x", b"y"]
    assert "subscriber bug" in capfd.readouterr().err


def test_subscribing_again_after_unsubscribing_gets_later_messages(store):
    for round_ in range(5):
        inbox = _Inbox()
        unsubscribe = store.subscribe("again", inbox)
        store.publish("again", b"%d" % round_)
        assert inbox.wait_for(1) == [b"%d" % round_]
        unsubscribe()


def test_a_subscriber_may_subscribe_from_its_callback(store):
    inner, done = _Inbox(), _Inbox()

    def outer(message):
        store.subscribe("inner", inner)
        done(message)

    unsubscribe = store.subscribe("outer", outer)
    store.publish("outer", b"go")
    done.wait_for(1)
    unsubscribe()
    watcher = _Inbox()
    store.subscribe("inner", watcher)  # returns once "inner" is subscribed
    store.publish("inner", b"hello")
    assert watcher.wait_for(1) == [b"hello"]
    assert inner.wait_for(1) == [b"hello"]


def test_a_busy_channel_does_not_hold_up_a_subscription(store):
    stop, flood = threading.Event(), _Inbox()
    store.subscribe("busy", flood)

    def publish():
        while not stop.is_set():
            store.publish("busy", b"x")

    publisher = threading.Thread(target=publish, daemon=True)
    publisher.start()
    try:
        flood.wait_for(100)  # the listener is busy delivering
        quiet = _Inbox()
        store.subscribe("quiet", quiet)
        store.publish("quiet", b"heard")
        assert quiet.wait_for(1) == [b"heard"]
    finally:
        stop.set()
        publisher.join(JOIN_TIMEOUT)
    assert not publisher.is_alive()


def test_messages_and_channels_are_checked(store):
    with pytest.raises(TypeError, match="message must be bytes"):
        store.publish("c", "text")
    with pytest.raises(TypeError, match="channel must be a str"):
        store.publish(b"c", b"x")
    with pytest.raises(TypeError, match="must be callable"):
        store.subscribe("c", None)


# -- functions ---------------------------------------------------------------------
def test_functions_are_written_once(tables):
    fid = ids.function_id(b"code")
    assert tables.function(fid) is None
    tables.register_function(fid, b"code")
    tables.register_function(fid, b"other")
    assert tables.function(fid) == b"code"


# -- actors and their names --------------------------------------------------------
def test_concurrent_name_claims_exactly_one_wins(tables):
    contenders = [_actor("only-one") for _ in range(THREADS)]
    results = _in_threads(THREADS, lambda i: tables.create_actor(contenders[i]))
    winners = [a for a, r in zip(contenders, results) if r is None]
    assert len(winners) == 1, results
    assert all(isinstance(r, exc.ActorAlreadyExistsError) for r in results if r is not None)
    [winner] = winners
    assert tables.named_actor("only-one", "ns").actor_id == winner.actor_id
    # A loser leaves nothing behind.
    assert [a for a in contenders if tables.actor(a.actor_id) is not None] == [winner]


def test_a_live_actors_name_is_not_taken(tables):
    first = _actor()
    tables.create_actor(first)
    for state in (ActorState.PENDING, ActorState.ALIVE, ActorState.RESTARTING):
        tables.set_actor_state(first.actor_id, state)
        second = _actor()
        with pytest.raises(exc.ActorAlreadyExistsError, match="'counter' already exists "
                                                             "in namespace 'ns'"):
            tables.create_actor(second)
        assert tables.actor(second.actor_id) is None
    # The same name in another namespace is another name.
    tables.create_actor(_actor(namespace="elsewhere"))


def test_a_dead_actors_name_is_freed(tables):
    first = _actor()
    tables.create_actor(first)
    info = tables.set_actor_state(first.actor_id, "DEAD", "killed")
    assert (info.state, info.reason) == (ActorState.DEAD, "killed")
    assert tables.named_actor("counter", "ns") is None
    assert tables.named_actors() == []
    second = _actor()
    tables.create_actor(second)
    assert tables.named_actor("counter", "ns").actor_id == second.actor_id


def test_the_end_of_a_job_kills_its_actors_but_detached_ones(tables):
    mine, kept, theirs = _actor("a"), _actor("b"), _actor("c")
    for info in (mine, kept, theirs):
        tables.create_actor(info)
    tables.note_job_actor("job-1", mine.actor_id, detached=False)
    tables.note_job_actor("job-1", kept.actor_id, detached=True)
    tables.note_job_actor("job-2", theirs.actor_id, detached=False)
    tables.end_job_actors("job-1")
    assert tables.actor(mine.actor_id).state == ActorState.DEAD
    assert tables.named_actor("a", "ns") is None  # (its name is free again)
    assert tables.actor(kept.actor_id).state != ActorState.DEAD
    assert tables.actor(theirs.actor_id).state != ActorState.DEAD
    tables.end_job_actors("job-1")  # (its list is gone: nothing more happens)
    tables.end_job_actors("job-2")
    assert tables.actor(theirs.actor_id).state == ActorState.DEAD
    assert tables.actor(kept.actor_id).state != ActorState.DEAD


def test_a_dead_holders_name_is_taken_over_by_exactly_one(tables, store):
    dead = _actor()
    tables.create_actor(dead)
    tables.set_actor_state(dead.actor_id, ActorState.DEAD, "crashed")
    # As a process that died between its two writes leaves it: the record says
    # DEAD, the name still points at it.
    store.put(NAMED_ACTORS, named_actor_key("ns", "counter"), dead.actor_id)
    contenders = [_actor() for _ in range(THREADS)]
    results = _in_threads(THREADS, lambda i: tables.create_actor(contenders[i]))
    winners = [a for a, r in zip(contenders, results) if r is None]
    assert len(winners) == 1, results
    assert tables.named_actor("counter", "ns").actor_id == winners[0].actor_id


def test_dead_is_final_whatever_updates_race_with_it(tables):
    actor = _actor()
    tables.create_actor(actor)

    def update(i):
        for n in range(50):
            if i == 0 and n == 25:
                tables.set_actor_state(actor.actor_id, ActorState.DEAD, "killed")
            else:
                tables.set_actor_state(actor.actor_id,
                                       ActorState.ALIVE if n % 2 else ActorState.RESTARTING,
                                       node_id=f"node-{i}")

    assert _in_threads(THREADS, update) == [None] * THREADS
    info = tables.actor(actor.actor_id)
    assert (info.state, info.reason) == (ActorState.DEAD, "killed")
    assert tables.named_actor("counter", "ns") is None
    # Later updates leave it dead.
    assert tables.set_actor_state(actor.actor_id, ActorState.ALIVE).state is ActorState.DEAD


def test_forget_actor_removes_record_and_name(tables):
    actor = _actor()
    tables.create_actor(actor)
    tables.forget_actor(actor.actor_id)
    assert tables.actor(actor.actor_id) is None
    assert tables.named_actor("counter", "ns") is None
    tables.create_actor(_actor())


def test_names_with_separators_do_not_collide(tables):
    tables.create_actor(_actor(name="b:c", namespace="a"))
    tables.create_actor(_actor(name="c", namespace="a:b"))
    assert {(i.namespace, i.name) for i in tables.named_actors()} == {("a", "b:c"), ("a:b", "c")}


# -- nodes -------------------------------------------------------------------------
def test_nodes_register_heartbeat_and_die(tables):
    node = tables.register_node("node-1", "10.0.0.1:7000", {"CPU": 4.0}, now=100.0)
    assert (node.state, node.heartbeat, node.resources) == (NodeState.ALIVE, 100.0, {"CPU": 4.0})
    assert tables.heartbeat("node-1", now=105.0).heartbeat == 105.0
    assert tables.heartbeat("node-1", now=103.0).heartbeat == 105.0  # never goes back
    assert tables.heartbeat("unknown") is None
    assert tables.mark_node_dead("node-1").state is NodeState.DEAD
    assert tables.heartbeat("node-1", now=200.0).state is NodeState.DEAD
    with pytest.raises(exc.BackendError, match="node-1 was declared dead"):
        tables.register_node("node-1", "10.0.0.1:7000", {"CPU": 4.0})
    assert [n.node_id for n in tables.nodes()] == ["node-1"]


def test_heartbeats_racing_a_death_leave_the_node_dead(tables):
    tables.register_node("node-1", "10.0.0.1:7000", {"CPU": 4.0})

    def beat(i):
        for n in range(50):
            if i == 0 and n == 25:
                tables.mark_node_dead("node-1")
            else:
                tables.heartbeat("node-1")

    assert _in_threads(THREADS, beat) == [None] * THREADS
    assert tables.node("node-1").state is NodeState.DEAD


# -- object locations --------------------------------------------------------------
def test_concurrent_location_updates_lose_nothing(tables):
    object_id = ids.new_id()
    per_thread = 20

    def add(i):
        for n in range(per_thread):
            tables.add_object_location(object_id, f"node-{i}-{n}")

    assert _in_threads(THREADS, add) == [None] * THREADS
    everything = {f"node-{i}-{n}" for i in range(THREADS) for n in range(per_thread)}
    assert tables.object_locations(object_id) == everything

    def remove_even(i):
        for n in range(0, per_thread, 2):
            tables.remove_object_location(object_id, f"node-{i}-{n}")

    assert _in_threads(THREADS, remove_even) == [None] * THREADS
    odd = {f"node-{i}-{n}" for i in range(THREADS) for n in range(1, per_thread, 2)}
    assert tables.object_locations(object_id) == odd
    for node_id in odd:
        tables.remove_object_location(object_id, node_id)
    assert tables.object_locations(object_id) == frozenset()
    assert tables.store.keys("object_locations") == []


# -- what the tables refuse ----------------------------------------------------------
class _AlwaysOvertaken(ControlStore):
    """A store shared with another node that adds itself to an object's
    locations just before each of our compare-and-sets (as a busy cluster
    might, every time)."""

    def __init__(self, inner: ControlStore):
        self.inner = inner
        self.other = Tables(inner)
        self.writes = 0

    def compare_and_set(self, table, key, expected, new):
        self.writes += 1
        self.other.add_object_location(key, f"other-node-{self.writes}")
        return self.inner.compare_and_set(table, key, expected, new)

    def put(self, table, key, value, overwrite=True):
        return self.inner.put(table, key, value, overwrite)

    def get(self, table, key):
        return self.inner.get(table, key)

    def delete(self, table, key):
        return self.inner.delete(table, key)

    def keys(self, table):
        return self.inner.keys(table)

    def publish(self, channel, message):
        self.inner.publish(channel, message)

    def subscribe(self, channel, callback):
        return self.inner.subscribe(channel, callback)


def test_an_update_that_never_settles_gives_up_with_a_clear_error(store):
    tables = Tables(_AlwaysOvertaken(store))
    object_id = ids.new_id()
    with pytest.raises(exc.BackendError, match=f"changed it {MAX_ATTEMPTS} times in a row"):
        tables.add_object_location(object_id, "node-1")
    assert "node-1" not in Tables(store).object_locations(object_id)


def test_reading_a_record_never_runs_code(tables, store, tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    actor_id = ids.new_id()
    store.put("actors", actor_id, pickle.dumps((1, Payload())))
    with pytest.raises(exc.BackendError, match="holds no readable record"):
        tables.actor(actor_id)
    assert not marker.exists()
    store.put("actors", actor_id, pickle.dumps((99, "from the future")))
    with pytest.raises(exc.BackendError, match="another record format"):
        tables.actor(actor_id)


# -- through the local backend's workers ---------------------------------------------
@ray.remote
class Holder:
    def where(self):
        return os.getpid(), ray.get_runtime_context().get_actor_name()


@ray.remote(num_cpus=0)
def create_named(name: str) -> bool:
    """Create a detached actor called `name`; False if one exists already."""
    try:
        Holder.options(name=name, lifetime="detached").remote()
    except exc.ActorAlreadyExistsError:
        return False
    return True


@ray.remote(num_cpus=0)
def call_named(name: str):
    return ray.get(ray.get_actor(name).where.remote(), timeout=60)


def test_named_actor_created_in_a_task_is_found_from_the_driver(start):
    start()
    assert ray.get(create_named.remote("made-in-task"), timeout=60) is True
    handle = ray.get_actor("made-in-task")
    pid, name = ray.get(handle.where.remote(), timeout=60)
    assert name == "made-in-task" and pid != os.getpid()
    assert "made-in-task" in ray.util.list_named_actors()
    # And from another task, and not twice.
    assert ray.get(call_named.remote("made-in-task"), timeout=60) == (pid, name)
    assert ray.get(create_named.remote("made-in-task"), timeout=60) is False
    ray.kill(handle)


def test_tasks_racing_for_a_name_exactly_one_wins(start):
    start()
    created = ray.get([create_named.remote("contested") for _ in range(8)], timeout=120)
    assert sorted(created) == [False] * 7 + [True]
    ray.kill(ray.get_actor("contested"))
