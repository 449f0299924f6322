"""The cluster's node daemons: a head, and members that join it.

Each daemon is one process that runs the node engine of the local backend
(`Node`: worker launcher, shared-memory store, scheduler) unchanged, with
the cluster's Redis as its control store, and listens on one TCP port
(ZeroMQ, every peer authenticated with the cluster's token).

- The **head** starts the cluster's Redis (a private ``redis-server`` with
  a password and AOF, unless given one), and keeps the membership: members
  join it over ZeroMQ, heartbeat every `HEARTBEAT_INTERVAL`, and are
  declared DEAD in the nodes table at once when their connection drops (a
  killed member's closes at once), or after `dead_after()` seconds of
  silence (10 by default, ``BEAMLET_DEAD_AFTER``; a frozen member's
  connection is closed by the transport's heartbeats after as long). A
  member starved of CPU for less than that (a loaded machine) stays the
  same node. It answers ``beamlet status``.
- A **member** joins the head, learns the control store's address from it,
  and heartbeats with its figures. If the head goes away it reconnects as
  a new node (a node declared dead never comes back under its old id), and
  exits when the head stays away for `HEAD_LOST_TIMEOUT` seconds.

Started by ``beamlet start`` (``commands.py``) as
``python -m beamlet.backends.zmq.daemon``: the token arrives as the first
line on stdin, never in argv or the environment; the daemon reports one JSON
line on stdout once it is ready (or why it failed), then writes only to its
log. SIGTERM or SIGINT stop it cleanly: workers, segments, Redis (the head's
own), files.

Drivers connect to every node's listener and run tasks there: the node's
side of that is ``jobs.py`` (`DriverOwner`, the Node's job owner). No worker
is started before a task needs one.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import sys
import threading
import time
import traceback

from ... import exceptions as exc
from ...core.control_store import open_control_store
from ...core.interfaces import Left, Received
from ...core.resources import ResourcePool
from ...core.tables import Tables
from ..local.node import Node, default_store_capacity
from . import protocol as P
from .jobs import DriverOwner
from .transport import dead_after

HEAD_LOST_TIMEOUT = 60.0  # seconds a member waits for a lost head before it exits
REDIS_RETRY = 1.0  # seconds a daemon's Redis call may retry: its loop must not stall
TICK = 0.25  # seconds between the loop's timed chores
LOCATIONS_INTERVAL = 0.25  # seconds between writes of object locations to the control store


def log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} beamlet daemon {os.getpid()}: {message}",
          file=sys.stderr, flush=True)


def _node_id() -> str:
    return f"node-{secrets.token_hex(8)}"


class Daemon:
    """What a head and a member share: the Node, the listener, the loop."""

    role = "?"

    def __init__(self, args, secret: bytes):
        from .transport import ZmqTransport
        self.args = args
        self.secret = secret
        self.node_id = _node_id()
        self.transport = ZmqTransport(secret, P.VERSION, codec=P.CODEC)
        self.listener = None
        self.node: Node | None = None
        self.control_store = None
        self.owner: DriverOwner | None = None
        self._stopping = False

    def _pool(self) -> ResourcePool:
        return ResourcePool(self.args.num_cpus, self.args.num_gpus,
                            json.loads(self.args.resources) if self.args.resources else None)

    def _start_node(self, control_store_url: str) -> None:
        self.control_store = open_control_store(control_store_url)
        self.tables = Tables(self.control_store)
        owner = self.owner = DriverOwner()
        self.node = Node(owner, self.control_store, self._pool(),
                         self.args.object_store_memory or default_store_capacity(),
                         100 * 1024, prestart_workers=0)
        owner.attach(self.node, self.transport)
        owner.secret = self.secret  # (for heirs of jobs whose drivers left: jobs.py)
        self._locations_wake = threading.Event()
        self._locations_writer = threading.Thread(target=self._record_locations,
                                                  name="beamlet-locations", daemon=True)
        self._locations_writer.start()
        self.node.node_id = self.node_id  # (what tasks see as their node's id)

    def resources(self) -> dict:
        return self.node.scheduler.total_resources()

    def stats(self) -> dict:
        """This node's figures for ``beamlet status``."""
        store = self.node.object_store.stats()
        sched = self.node.scheduler.stats()
        return {"available": self.node.scheduler.available_resources(),
                "store_bytes_used": store["shm_bytes"] + store["spilled_bytes"],
                "store_objects": store["num_objects"],
                "store_capacity": self.node.object_store.capacity,
                "queued": sched["queued"] + sched["waiting"], "actors": sched["actors"],
                "workers": sched["workers"]}

    def stop(self, *_) -> None:
        """Make the loop end (safe from a signal handler)."""
        self._stopping = True
        listener = self.listener
        if listener is not None and not listener.closed:
            listener.wake()

    def serve(self) -> None:
        # (The listener's own wait: one epoll per wake-up, where a selector
        # over its descriptor costs a second one, and Python, per message.)
        poll = self.listener.poll
        on_event = self.on_event
        next_tick = 0.0
        while not self._stopping:
            for event in poll(TICK):
                on_event(event)
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + TICK
                self.tick(now)
                if self.owner is not None:
                    self.owner.flush_events()

    def on_event(self, event) -> None:
        """An event of our listener (peers connecting to this node)."""
        kind = type(event)
        if kind is Received:
            for message in event.messages:
                if type(message) is P.StatusRequest:
                    event.conn.send(P.StatusReply(self.status()))
                elif not self.from_driver(event.conn, message):
                    return
        elif kind is Left:
            self.driver_left(event.conn)

    def from_driver(self, conn, message) -> bool:
        """Serve a driver's message; False (and the connection closed) if it is
        not one, or breaks the protocol."""
        if type(message) is P.WorkersRequest and self.node is not None:
            conn.send(P.WorkersReply(self.node.scheduler.describe_workers()))
            return True
        if type(message) not in P.FROM_DRIVER or self.owner is None:
            log(f"closed a connection that sent {P.describe(message)}")
            conn.close()
            self.driver_left(conn)
            return False
        try:
            self.owner.on_message(conn, message)
        except ValueError as err:
            log(f"closed a driver's connection: {err}")
            conn.close()
            self.driver_left(conn)
            return False
        except Exception as err:  # noqa: BLE001 - one bad message must not stop the daemon
            log(f"error handling {type(message).__name__} from a driver: {err!r}\n"
                f"{traceback.format_exc()}")
        return True

    def driver_left(self, conn) -> None:
        if self.owner is not None:
            self.owner.driver_left(conn)

    def tick(self, now: float) -> None:
        """The timed chores, every `TICK`."""

    def _record_locations(self) -> None:
        """The location writer's thread: record what this node holds for
        drivers in the control store, off every task's path (and off the loop,
        which a control store that is down would stall); kept for later while
        it is down."""
        failing = False
        while not self._stopping:
            try:
                self.owner.record_locations(self.tables, self.node_id)
                self.owner.check_owners(self.tables)
                self.owner.send_claims(self.tables, self.node_id)
                failing = False
            except exc.BackendError as err:
                if not failing:
                    log(f"cannot record object locations yet: {err}")
                failing = True
            self._locations_wake.wait(LOCATIONS_INTERVAL * (8 if failing else 1))

    def status(self) -> list:
        return []

    def close(self) -> None:
        if self.owner is not None:
            self._stopping = True
            self._locations_wake.set()
            self._locations_writer.join(5)
            self.owner.close()
        if self.node is not None:
            self.node.close()
        if self.listener is not None:
            self.listener.close()
        if self.control_store is not None:
            self.control_store.close()
        self.transport.close()


class HeadDaemon(Daemon):
    """The head: Redis, membership, status."""

    role = "head"

    def __init__(self, args, secret: bytes):
        super().__init__(args, secret)
        self.redis = None
        self._members: dict = {}  # connection -> node id
        self._joined: dict[str, tuple] = {}  # node id -> (address, resources), while alive
        self._last_beat: dict[str, float] = {}  # node id -> monotonic time of its last word
        self._stats: dict[str, dict] = {}  # node id -> figures from its last heartbeat
        self._dead: list[str] = []  # declared dead, not yet written to Redis
        self._redis_ok = True
        self._next_own_beat = 0.0
        self.dead_after = dead_after()

    def start(self) -> dict:
        from ..redis.server import RedisServer
        if self.args.redis_address:
            password = os.environ.get("BEAMLET_REDIS_PASSWORD", "")
            auth = f":{password}@" if password else ""
            base = f"redis://{auth}{self.args.redis_address}"
        else:
            self.redis = RedisServer(host=self.args.host).start()
            base = self.redis.url
        self.control_store_url = (f"{base}?namespace=beamlet-{secrets.token_hex(6)}"
                                  f"&retry_for={REDIS_RETRY}")
        self._start_node(self.control_store_url)
        self.listener = self.transport.listen(f"{self.args.host}:{self.args.port or 0}")
        self.tables.register_node(self.node_id, self.listener.address, self.resources())
        self.owner.heir_address = self.listener.address
        return {"address": self.listener.address, "node_id": self.node_id,
                "redis_pid": self.redis.pid if self.redis is not None else None}

    def on_event(self, event) -> None:
        kind = type(event)
        if kind is Received:
            for message in event.messages:
                if type(message) in P.TO_HEAD:
                    self._on_message(event.conn, message)
                elif event.conn in self._members:
                    log(f"closed a connection that sent {P.describe(message)}")
                    self._gone(event.conn, "it broke the protocol")
                    event.conn.close()
                    return
                elif not self.from_driver(event.conn, message):
                    return
        elif kind is Left:
            self.driver_left(event.conn)
            self._gone(event.conn, f"its connection dropped ({event.error})" if event.error
                       else "its connection dropped")

    def _on_message(self, conn, message) -> None:
        kind = type(message)
        if kind is P.Heartbeat:
            node_id = self._members.get(conn)
            if node_id == message.node_id:
                self._last_beat[node_id] = time.monotonic()
                self._stats[node_id] = message.stats
        elif kind is P.NodeJoin:
            self._join(conn, message)
        elif kind is P.StatusRequest:
            conn.send(P.StatusReply(self.status()))
        elif kind is P.DriverJoin:
            conn.send(P.DriverAccepted(self.control_store_url, self.status()))

    def _join(self, conn, message: P.NodeJoin) -> None:
        node_id, address, resources = message
        if not (isinstance(node_id, str) and isinstance(address, str)
                and isinstance(resources, dict)) or conn in self._members:
            conn.send(P.Refused("a malformed or repeated join"))
            return
        try:
            self.tables.register_node(node_id, address, resources)
        except exc.BackendError as err:
            conn.send(P.Refused(str(err)))
            return
        self._members[conn] = node_id
        self._joined[node_id] = (address, resources)
        self._last_beat[node_id] = time.monotonic()
        conn.send(P.JoinAccepted(self.control_store_url, P.HEARTBEAT_INTERVAL, self.dead_after))
        log(f"node {node_id} at {address} joined with {resources}")

    def _gone(self, conn, why: str) -> None:
        node_id = self._members.pop(conn, None)
        if node_id is not None:
            self._declare_dead(node_id, why)

    def _declare_dead(self, node_id: str, why: str) -> None:
        self._last_beat.pop(node_id, None)
        self._stats.pop(node_id, None)
        self._joined.pop(node_id, None)
        log(f"node {node_id} is dead: {why}")
        self._dead.append(node_id)
        self._write_dead()

    def _write_dead(self) -> None:
        while self._dead:
            try:
                self.tables.mark_node_dead(self._dead[0])
                self.tables.remove_node_locations(self._dead[0])
            except exc.BackendError as err:
                self._redis_down(err)
                return
            self._dead.pop(0)

    def _redis_down(self, err: BaseException) -> None:
        if self._redis_ok:
            log(f"the control store is unreachable, retrying: {err}")
        self._redis_ok = False

    def tick(self, now: float) -> None:
        if self.redis is not None and not self.redis.running():
            self._restart_redis()
        for conn, node_id in list(self._members.items()):
            if now - self._last_beat.get(node_id, now) > self.dead_after:
                del self._members[conn]
                conn.close()
                self._declare_dead(node_id, f"no heartbeat for {self.dead_after}s")
        if now >= self._next_own_beat:
            self._next_own_beat = now + 1.0
            try:
                self.tables.heartbeat(self.node_id)
                for node_id in self._last_beat:
                    self.tables.heartbeat(node_id)
                if not self._redis_ok:
                    log("the control store is back")
                    self._redis_ok = True
                self._write_dead()
            except exc.BackendError as err:
                self._redis_down(err)

    def _restart_redis(self) -> None:
        """Our Redis died: start it again on its port, password and data (AOF),
        and tell `beamlet stop` its new pid."""
        from .files import StateDir
        old = self.redis.pid
        log(f"the cluster's redis-server (pid {old}) exited; starting it again")
        try:
            self.redis.stop(remove_dir=False)
            self.redis.start()
        except exc.BackendError as err:
            log(f"cannot restart redis-server: {err}")
            return
        try:
            state = StateDir()
            state.forget_process(old)
            state.record_process(self.redis.pid, "redis", "")
        except exc.BackendError as err:
            log(f"cannot record the new redis-server's pid: {err}")

    def status(self) -> list:
        """One dict per node: id, address, state, resources, figures. From the
        nodes table; while the control store is unreachable, from what the
        head knows itself (the nodes alive now)."""
        own = {self.node_id: self.stats(), **self._stats}
        try:
            records = [(i.node_id, i.address, str(i.state), i.resources)
                       for i in self.tables.nodes()]
        except exc.BackendError:
            records = [(self.node_id, self.listener.address, "ALIVE", self.resources())]
            records += [(node_id, address, "ALIVE", resources)
                        for node_id, (address, resources) in self._joined.items()]
        return [{"node_id": node_id, "address": address, "state": state,
                 "resources": resources, "head": node_id == self.node_id,
                 **own.get(node_id, {})}
                for node_id, address, state, resources in records]

    def close(self) -> None:
        try:
            self.tables.mark_node_dead(self.node_id)
        except (exc.BackendError, AttributeError):
            pass
        super().close()
        if self.redis is not None:
            self.redis.stop()


class MemberDaemon(Daemon):
    """A member: joins the head, heartbeats, rejoins a restarted head."""

    role = "node"

    def __init__(self, args, secret: bytes):
        super().__init__(args, secret)
        self.head = None  # the connection to the head
        self._head_lost_at: float | None = None
        self._next_beat = 0.0
        self._next_try = 0.0
        self._beat_every = P.HEARTBEAT_INTERVAL  # (the head's, once joined)

    def start(self) -> dict:
        self.head = self.transport.connect(self.args.address, timeout=10)
        self.listener = self.transport.listen(f"{self.args.host}:{self.args.port or 0}")
        accepted = self._join()
        self._start_node(accepted.control_store_url)
        self.owner.heir_address = self.args.address
        return {"address": self.listener.address, "node_id": self.node_id}

    def _join(self) -> P.JoinAccepted:
        resources = (self.resources() if self.node is not None
                     else self._pool().total())
        self.head.send(P.NodeJoin(self.node_id, self.listener.address, resources))
        reply = self.head.recv(timeout=10)
        if type(reply) is P.Refused:
            raise exc.BackendError(f"the head refused this node: {reply.reason}")
        if type(reply) is not P.JoinAccepted:
            raise exc.BackendError(f"the head answered {P.describe(reply)} to a join")
        self._beat_every = reply.heartbeat_s
        return reply

    def tick(self, now: float) -> None:
        if self.head is not None:
            try:
                for message in self.head.recv_all():
                    if type(message) is P.Refused:
                        log(f"the head dropped this node: {message.reason}")
                        self._lost_head(now)
                        return
            except EOFError:
                self._lost_head(now)
                return
            if now >= self._next_beat:
                self._next_beat = now + self._beat_every
                try:
                    self.head.send(P.Heartbeat(self.node_id, self.stats()))
                except exc.BackendError:
                    self._lost_head(now)
        elif now >= self._next_try:
            self._next_try = now + 1.0
            self._rejoin(now)

    def _lost_head(self, now: float) -> None:
        log("lost the head; reconnecting")
        self.head.close()
        self.head = None
        self._head_lost_at = now

    def _rejoin(self, now: float) -> None:
        if now - self._head_lost_at > HEAD_LOST_TIMEOUT:
            log(f"the head has been away for {HEAD_LOST_TIMEOUT}s: stopping")
            self.stop()
            return
        try:
            self.head = self.transport.connect(self.args.address, timeout=2)
            self.node_id = self.node.node_id = _node_id()  # it was declared dead under the old one
            self._join()
        except exc.BackendError as err:
            if self.head is not None:
                self.head.close()
                self.head = None
            log(f"cannot rejoin the head yet: {err}")
            return
        log(f"rejoined the head as {self.node_id}")

    def close(self) -> None:
        if self.head is not None:
            self.head.close()
        super().close()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m beamlet.backends.zmq.daemon")
    parser.add_argument("--head", action="store_true")
    parser.add_argument("--address", help="the head's HOST:PORT (a member)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--redis-address")
    parser.add_argument("--num-cpus", type=float)
    parser.add_argument("--num-gpus", type=float)
    parser.add_argument("--resources")
    parser.add_argument("--object-store-memory", type=int)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """Run a daemon until SIGTERM/SIGINT; the token comes on stdin."""
    args = parse_args(argv)
    token = sys.stdin.readline().strip()
    try:
        secret = bytes.fromhex(token)
    except ValueError:
        secret = b""
    daemon = None
    try:
        daemon = (HeadDaemon if args.head else MemberDaemon)(args, secret)
        signal.signal(signal.SIGTERM, daemon.stop)
        signal.signal(signal.SIGINT, daemon.stop)
        info = daemon.start()
    except BaseException as err:  # noqa: BLE001 - the starter is told why, then we exit
        detail = str(err) or type(err).__name__
        if not isinstance(err, (exc.BackendError, ValueError, OSError)):
            detail += "\n" + traceback.format_exc()
        print(json.dumps({"ok": False, "error": detail}), flush=True)
        if daemon is not None:
            daemon.close()
        return 1
    print(json.dumps({"ok": True, "role": daemon.role, **info}), flush=True)
    os.dup2(2, 1)  # from now on stdout goes to the log too
    log(f"{daemon.role} {daemon.node_id} listening at {info['address']}")
    try:
        daemon.serve()
    finally:
        log("stopping")
        daemon.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
