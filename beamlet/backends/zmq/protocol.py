"""The messages between a cluster's daemons (and the ``beamlet`` commands
that ask them), over the ZeroMQ transport: typed, versioned, one table.

Like the node's protocol (``backends/local/protocol.py``), each message is
a ``NamedTuple``; `VERSION` is bound into every connection's handshake, so a
daemon or command of another version is refused at connect, naming both.

    member -> head   NodeJoin(node_id, address, resources)   once, first
    head -> member   JoinAccepted(control_store_url, heartbeat_s, dead_after_s)
    member -> head   Heartbeat(node_id, stats)                every heartbeat_s
    any -> head      StatusRequest()
    head -> any      StatusReply(nodes)
    head -> member   Refused(reason)                          then it closes
"""
from __future__ import annotations

from typing import NamedTuple

VERSION = "beamlet-cluster/1"

#: Seconds between a member's heartbeats, and of silence after which the head
#: declares it dead (at once when its connection drops).
HEARTBEAT_INTERVAL = 0.5
DEAD_AFTER = 3.0


class NodeJoin(NamedTuple):
    node_id: str
    address: str     # the member's own listening address (host:port)
    resources: dict  # what it can hand out: {"CPU": 2.0, "GPU": 0.0, ...}


class JoinAccepted(NamedTuple):
    control_store_url: str  # the cluster's Redis (with its password)
    heartbeat_s: float
    dead_after_s: float


class Heartbeat(NamedTuple):
    node_id: str
    stats: dict  # resources available, object-store use, queued tasks, actors


class Refused(NamedTuple):
    reason: str


class StatusRequest(NamedTuple):
    pass


class StatusReply(NamedTuple):
    nodes: list  # one dict per node: see HeadDaemon.status()


#: What the head accepts on a connection, and what a member accepts from the head.
TO_HEAD = frozenset({NodeJoin, Heartbeat, StatusRequest})
TO_MEMBER = frozenset({JoinAccepted, Refused})


def describe(message) -> str:
    """A short description of a received value, for errors (never its repr in full)."""
    return f"{type(message).__name__} ({len(repr(message))} chars)"
