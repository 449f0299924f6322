"""Objects on a cluster: where they live, how they move, when they go.

A large object stays in the store of the node that made it; a task on
another node pulls it from there directly (never through the driver); every
copy is freed once the last ref is gone; and an object lost with its node is
made again from lineage, or raises ObjectLostError. Real daemons, redis-server
and sockets (see test_cluster.py).
"""
from __future__ import annotations

import gc
import os
import re
import signal
import sys

import numpy as np
import procs
import pytest

import beamlet
from beamlet import exceptions as exc
from beamlet.core import runtime
from beamlet.core.tables import Tables
from beamlet.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from test_cluster import _node_lines, cluster  # noqa: F401 - a fixture
from test_cluster_tasks import GET_TIMEOUT, checksum, driver, make_array  # noqa: F401

MB = 1 << 20


def store_mib(cluster, node_id: str) -> float:
    """The object-store use `beamlet status` shows for a node, in MiB."""
    line = _node_lines(cluster.status())[node_id]
    return float(re.search(r"([0-9.]+)/[0-9]+ MiB", line).group(1))


def test_an_array_goes_node_to_node_and_every_copy_is_freed(cluster, driver):
    head = cluster.start_head()
    first = cluster.join(head, "--resources", '{"gpu_box": 1}')
    second = cluster.join(head, "--resources", '{"ssd": 1}')
    driver(head)
    backend = runtime.current().backend
    array = make_array.remote(50)
    assert beamlet.wait([array], timeout=GET_TIMEOUT)[0]
    # A task that may run anywhere goes where its large argument is.
    assert beamlet.get(checksum.options(resources={}).remote(array),
                       timeout=GET_TIMEOUT)[0] == first
    node, total, nbytes = beamlet.get(checksum.remote(array), timeout=GET_TIMEOUT)
    n = 50 * MB // 8
    assert (node, total, nbytes) == (second, float(n * (n - 1) // 2), 50 * MB)
    # The 50 MB went from the first node to the second, not through us.
    assert backend.object_bytes_received < MB
    # Both nodes hold a copy (status figures come with heartbeats).
    assert procs.wait_until(lambda: store_mib(cluster, first) >= 50
                            and store_mib(cluster, second) >= 50, 20, interval=0.2), \
        cluster.status()
    # ... and say so in the control store (written off the tasks' path).
    tables, array_id = Tables(backend.control_store), array.id
    assert procs.wait_until(lambda: tables.object_locations(array_id) == {first, second},
                            20, interval=0.2), tables.object_locations(array_id)
    got = beamlet.get(array, timeout=GET_TIMEOUT)  # our own get pulls it
    assert got.shape == (n,) and got[-1] == n - 1
    assert backend.object_bytes_received >= 50 * MB
    # A ref held inside a task's result keeps it alive when ours is gone.
    holder = beamlet.put([array])
    del got, array
    assert store_mib(cluster, first) >= 50
    [inner] = beamlet.get(holder, timeout=GET_TIMEOUT)
    assert beamlet.get(checksum.remote(inner), timeout=GET_TIMEOUT)[1] == total
    del inner, holder
    # A result whose ref is gone before it is made is freed where it is made.
    make_array.remote(20)
    assert beamlet.get(make_array.remote(1), timeout=GET_TIMEOUT).nbytes == MB

    def freed():
        return store_mib(cluster, first) == 0 and store_mib(cluster, second) == 0

    assert procs.wait_until(freed, 20, interval=0.2), cluster.status()
    assert procs.wait_until(lambda: not tables.object_locations(array_id), 20, interval=0.2)
    # The buffer our get pulled the 50 MB into came back once its last view went,
    # and the next pull of that size reuses it (its pages are in place).
    gc.collect()
    kept = backend._buffers.bytes
    assert kept >= 50 * MB
    again = beamlet.get(make_array.remote(50), timeout=GET_TIMEOUT)
    assert backend._buffers.bytes <= kept - 50 * MB and again[-1] == n - 1
    again[0] = 7.0  # (writable, as an array pulled into a bytearray was)


@beamlet.remote(resources={"maker": 1}, num_returns=2)
def made_where(megabytes: int, fill):
    return (beamlet.get_runtime_context().get_node_id(),
            np.full(megabytes * MB // 8, fill[0]))


@beamlet.remote(resources={"maker": 1}, num_returns=2)
def put_where(megabytes: int):
    return (beamlet.get_runtime_context().get_node_id(),
            [beamlet.put(np.full(megabytes * MB // 8, 3.0))])


def test_pull_buffers_not_kept_are_let_go_without_errors(monkeypatch):
    """A pull buffer the pool does not keep (over its capacity, or after it
    closed) is unmapped with its last view, not closed by the finalizer while
    that view still exports it (which raised BufferError, ignored and logged)."""
    from beamlet.backends.zmq.objects import BufferPool
    raised = []
    monkeypatch.setattr(sys, "unraisablehook", raised.append)
    pool = BufferPool(1 << 20)
    view = pool.take(4 << 20)  # (over the capacity: not kept once freed)
    array = np.frombuffer(view, dtype=np.uint8)
    array[:] = 7
    del view, array
    gc.collect()
    small = pool.take(1000)
    del small
    gc.collect()
    assert pool.bytes >= 1000 and len(pool._free) == 1  # (this one is kept)
    pool.close()
    late = pool.take(1000)
    del late
    gc.collect()
    assert pool.bytes == 0 and not pool._free
    assert not raised, [repr(r.exc_value) for r in raised]


def test_an_object_lost_with_its_node_is_made_again_or_lost(cluster, driver):
    head = cluster.start_head()
    # (Room for two tasks on each node: a task that fits no node at once waits
    # in the driver for the first that frees, spillback, wherever that is.)
    one = cluster.join(head, "--num-cpus", "2", "--resources", '{"maker": 2}')
    two = cluster.join(head, "--num-cpus", "2", "--resources", '{"maker": 2}')
    addresses = {node_id: _node_lines(cluster.status())[node_id].split()[2]
                 for node_id in (one, two)}
    driver(head)
    # One of each on each node, pinned: placement on the least loaded node cannot
    # promise it (a task that finished before the next is placed no longer weighs on
    # its node), nor does Ray's. A made object's pin is soft, so that its task may
    # run again on the other node once its own is gone.
    fill = beamlet.put(np.array([7.0]))
    made = [made_where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        node, soft=True)).remote(4, fill) for node in (one, two)]
    del fill  # (kept while what its task made lives: its lineage)
    put = [put_where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        node, soft=False)).remote(4) for node in (one, two)]
    assert beamlet.get([m[0] for m in made] + [p[0] for p in put],
                       timeout=GET_TIMEOUT) == [one, two, one, two]
    made_on, put_on = dict(zip((one, two), made)), dict(zip((one, two), put))
    doomed, survivor = one, two
    lost_made = made_on[doomed][1]
    [lost_put] = beamlet.get(put_on[doomed][1], timeout=GET_TIMEOUT)
    [kept_put] = beamlet.get(put_on[survivor][1], timeout=GET_TIMEOUT)
    tables = Tables(runtime.current().backend.control_store)
    assert procs.wait_until(lambda: doomed in tables.object_locations(lost_put.id), 20,
                            interval=0.1)
    os.kill(cluster.pid_of(addresses[doomed]), signal.SIGKILL)
    # The head forgets what the dead node held, in the locations table too.
    assert procs.wait_until(lambda: doomed not in tables.object_locations(lost_put.id), 20,
                            interval=0.1)
    # Made by a task: its task runs again on the other node.
    value = beamlet.get(lost_made, timeout=GET_TIMEOUT)
    assert value.shape == (4 * MB // 8,) and (value == 7.0).all()
    assert procs.wait_until(lambda: store_mib(cluster, survivor) >= 12, 20, interval=0.2)
    # Put by a worker there: lost, said so (no get hangs).
    with pytest.raises(exc.ObjectLostError, match="cannot be made again"):
        beamlet.get(lost_put, timeout=GET_TIMEOUT)
    assert (beamlet.get(kept_put, timeout=GET_TIMEOUT) == 3.0).all()
    assert (beamlet.get(made_on[survivor][1], timeout=GET_TIMEOUT) == 7.0).all()


# -- a pull's pieces are authenticated ------------------------------------------------------
# A node serving two objects (A, then B) to the pulls of one connection, as `serve_pull`
# does, while it plays an attacker on the wire for its first connection: it alters the
# sealed frames of B's pieces on their way to the socket (what someone on the path can do:
# flip a byte, cut a piece, replay one of A's pieces in B's place, swap two). Later
# connections are served honestly. argv: the mode; stdin: the cluster's secret (hex).
TAMPERING_NODE = r'''
import os, select, signal, sys
import numpy as np
from beamlet.backends.local.object_store import LocalObjectStore
from beamlet.backends.local.session import SessionLock
from beamlet.backends.zmq import objects, protocol as P
from beamlet.exceptions import BackendError
from beamlet.backends.zmq.transport import ZmqTransport
from beamlet.core.refcount import ReferenceCounter
from beamlet.core.serialization import serialize

secret = bytes.fromhex(sys.stdin.readline().strip())
mode = sys.argv[1]
refs = ReferenceCounter(lambda oid: None)
session = SessionLock()  # (a session's lock: another init()'s sweep leaves it be)
store = LocalObjectStore(refs, session.session, 1 << 30, 1024, lambda: session.temp_dir)
for name, seed in ((b"A", 1), (b"B", 2)):
    refs.incr(name * 16)  # (held: not freed)
    store.put(name * 16, serialize(np.random.default_rng(seed).integers(
        0, 255, size=3 << 20, dtype=np.uint8)))
transport = ZmqTransport(secret, P.VERSION)
listener = transport.listen("127.0.0.1:0")
send, first, pieces_of_a, pieces_of_b = listener._send, [], [], []

def on_the_wire(peer, frames, track=False):
    if not first:
        first.append(peer)
    if peer is not first[0] or frames[0][:1] != b"P":
        return send(peer, frames, track)
    if len(pieces_of_a) < 4:  # (A: 3 MiB and a header in 4 pieces)
        pieces_of_a.append(frames)
        return send(peer, frames, track)
    pieces_of_b.append(frames)
    if len(pieces_of_b) == 2:
        if mode == "forged":
            frames = [frames[0], bytes([frames[1][0] ^ 1]) + frames[1][1:]]
        elif mode == "truncated":
            frames = [frames[0], frames[1][:-100]]
        elif mode == "replayed":  # A's piece at the same offset
            frames = pieces_of_a[1]
        elif mode == "reordered":  # the third piece first
            return send(peer, [b""], track)  # (a probe, to have a tracker)
    elif len(pieces_of_b) == 3 and mode == "reordered":
        send(peer, frames)
        frames = pieces_of_b[1]
    return send(peer, frames, track)

listener._send = on_the_wire
print("LISTENING", listener.address, flush=True)
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
for _ in range(240):  # (a minute at most: the test stops it sooner)
    if stop:
        break
    select.select([listener], [], [], 0.25)
    for event in listener.poll():
        if type(event).__name__ == "Received":
            for message in event.messages:
                try:
                    objects.serve_pull(store, event.conn, message.object_ids)
                except BackendError:
                    pass  # (the puller hung up: as a node's loop does)
transport.close()
store.delete([b"A" * 16, b"B" * 16])
store.close()
os.rmdir(session.temp_dir)
session.release()
'''


@pytest.mark.parametrize("mode", ["forged", "truncated", "replayed", "reordered"])
def test_a_tampered_piece_fails_the_pull_and_the_node_pulls_on(tmp_path, capfd, mode):
    """A piece that does not authenticate fails its object's pull (nothing of it
    is stored or unpickled, its segment is dropped) and closes the connection;
    the object pulled before it on that connection arrived whole, and the same
    object pulled again (on a new connection) arrives whole."""
    import threading

    from beamlet.backends.local.object_store import LocalObjectStore
    from beamlet.backends.local.session import SessionLock
    from beamlet.backends.zmq import protocol as P
    from beamlet.backends.zmq.objects import Puller
    from beamlet.backends.zmq.transport import ZmqTransport
    from beamlet.core import auth
    from beamlet.core.refcount import ReferenceCounter
    from beamlet.core.serialization import deserialize

    secret = auth.new_secret()
    node = procs.Driver(TAMPERING_NODE, tmp_path, args=[mode], stdin=secret.hex() + "\n")
    transport = ZmqTransport(secret, P.VERSION)
    lock = SessionLock()  # (a session's lock: another init()'s sweep leaves it be)
    session = lock.session
    refs = ReferenceCounter(lambda oid: None)
    store = LocalObjectStore(refs, session, 1 << 30, 1024, lambda: lock.temp_dir)
    arrived, failed, changed = [], [], threading.Condition()

    def note(into):
        def record(object_ids, *rest):
            with changed:
                into.append(object_ids)
                changed.notify_all()
        return record

    puller = Puller(transport, store, note(arrived), lambda ids: note(failed)(list(ids)))

    def wait_for(condition):
        with changed:
            assert changed.wait_for(condition, 60), (arrived, failed, node.stderr,
                                                     capfd.readouterr().err)

    a, b = b"A" * 16, b"B" * 16
    refs.incr(a)  # (held: kept once they arrive)
    refs.incr(b)
    try:
        address = node.wait_line("LISTENING ").strip()
        puller.pull(address, [a])
        wait_for(lambda: arrived)
        puller.pull(address, [b])
        wait_for(lambda: failed)
        assert failed == [[b]] and arrived == [a]
        assert not store.contains(b)
        err = capfd.readouterr().err
        assert "does not authenticate" in err, (err, node.stderr)
        assert not [n for n in os.listdir("/dev/shm") if session in n and
                    n not in store._mappings and not n.endswith(".lock")], \
            "the failed pull's segment is left behind"
        puller.pull(address, [b])  # a new connection (the old one was closed)
        wait_for(lambda: len(arrived) == 2)
        for name, seed in ((a, 1), (b, 2)):
            value = deserialize(store.get([name], 10)[0])
            assert np.array_equal(value, np.random.default_rng(seed).integers(
                0, 255, size=3 << 20, dtype=np.uint8))
    finally:
        puller.close()
        store.delete([a, b])
        store.close()
        transport.close()
        node.proc.terminate()  # (it cleans up after itself)
        assert node.finish(30) == 0, node.stderr
        os.rmdir(lock.temp_dir)
        lock.release()
    assert not [n for n in os.listdir("/dev/shm") if session in n]


# -- streaming generators: items go to the driver as made, and leave the nodes -------------
def store_objects(head: dict) -> dict[str, int]:
    """node id -> how many objects its store holds (from its last heartbeat)."""
    from beamlet.backends.zmq.commands import parse_token, status
    return {n["node_id"]: n.get("store_objects", -1)
            for n in status(head["address"], parse_token(head["token"]))
            if n["state"] == "ALIVE"}


@beamlet.remote(resources={"maker": 1}, _generator_backpressure_num_objects=40)
def stream_from_member(n: int, big_every: int):
    """Items made on the member: every `big_every`-th one large (kept in its
    shared memory, pulled by the consumer), the others inline."""
    for i in range(n):
        yield np.full(MB // 8, float(i)) if i % big_every == 0 else i


def test_a_stream_from_another_node_leaves_nothing_on_the_nodes(cluster, driver):
    """A generator task on a member streams small and large items to the
    driver, held back by backpressure; once consumed and dropped, neither its
    items nor its consumer's acknowledgements stay in any node's store; a
    stream dropped half-way stops its producer and frees its items too."""
    head = cluster.start_head()
    member = cluster.join(head, "--resources", '{"maker": 1}')
    driver(head)
    assert procs.wait_until(lambda: set(store_objects(head)) == {head["node_id"], member},
                            20, interval=0.2)
    before = store_objects(head)
    total = big = 0
    for i, ref in enumerate(stream_from_member.remote(600, 50)):
        value = beamlet.get(ref, timeout=GET_TIMEOUT)
        if i % 50 == 0:
            assert value.shape == (MB // 8,) and value[0] == i
            big += 1
        else:
            total += value
    assert big == 12 and total == sum(i for i in range(600) if i % 50)
    del ref, value
    gen = stream_from_member.remote(10**6, 50)  # (endless but for backpressure)
    assert beamlet.get(next(gen), timeout=GET_TIMEOUT)[0] == 0.0
    done = gen.completed()
    del gen
    assert beamlet.get(done, timeout=GET_TIMEOUT) is None  # its producer stopped
    del done
    assert procs.wait_until(lambda: store_objects(head) == before, 20, interval=0.2), \
        (before, store_objects(head))
    # The driver forgot both streams, and withdrew the nodes' fetches of
    # acknowledgements that never came (none waits in its store).
    sched = runtime.current().backend.scheduler
    assert not sched.streams and not sched.signal_fetches
    assert not sched.store._indexed, list(sched.store._indexed)
