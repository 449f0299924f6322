"""Objects on a cluster: where they live, how they move, when they go.

A large object stays in the store of the node that made it; a task on
another node pulls it from there directly (never through the driver); every
copy is freed once the last ref is gone; and an object lost with its node is
made again from lineage, or raises ObjectLostError. Real daemons, redis-server
and sockets (see test_cluster.py).
"""
from __future__ import annotations

import os
import re
import signal

import numpy as np
import procs
import pytest

import beamlet
from beamlet import exceptions as exc
from beamlet.core import runtime
from beamlet.core.tables import Tables
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


@beamlet.remote(resources={"maker": 1}, num_returns=2)
def made_where(megabytes: int, fill):
    return (beamlet.get_runtime_context().get_node_id(),
            np.full(megabytes * MB // 8, fill[0]))


@beamlet.remote(resources={"maker": 1}, num_returns=2)
def put_where(megabytes: int):
    return (beamlet.get_runtime_context().get_node_id(),
            [beamlet.put(np.full(megabytes * MB // 8, 3.0))])


def test_an_object_lost_with_its_node_is_made_again_or_lost(cluster, driver):
    head = cluster.start_head()
    one = cluster.join(head, "--resources", '{"maker": 1}')
    two = cluster.join(head, "--resources", '{"maker": 1}')
    addresses = {node_id: _node_lines(cluster.status())[node_id].split()[2]
                 for node_id in (one, two)}
    driver(head)
    # Placement weighs what is placed: one of each on each node.
    fill = beamlet.put(np.array([7.0]))
    made = [made_where.remote(4, fill) for _ in range(2)]
    del fill  # (kept while what its task made lives: its lineage)
    put = [put_where.remote(4) for _ in range(2)]
    made_on = dict(zip(beamlet.get([m[0] for m in made], timeout=GET_TIMEOUT), made))
    put_on = dict(zip(beamlet.get([p[0] for p in put], timeout=GET_TIMEOUT), put))
    assert set(made_on) == set(put_on) == {one, two}
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
