"""``beamlet start``, ``beamlet stop`` and ``beamlet status``: the cluster's
command line (added to ``beamlet`` through the ``beamlet_cli_commands`` hook).

    beamlet start --head [--port P] [--host ADDR] [--redis-address HOST:PORT]
                         [--num-cpus N] [--num-gpus N] [--resources JSON]
    beamlet start --address HOST:PORT [--token T]       join a node
    beamlet status [--address HOST:PORT] [--token T]
    beamlet stop

`start` runs a daemon (``daemon.py``) in the background, hands it the token
on its stdin, waits until it reports that it is ready, records it in this
user's state directory (``files.py``) and prints what to do next. The token
of a join comes from ``--token``, else ``$BEAMLET_TOKEN``, else the cluster
file a head started on this machine wrote. `stop` ends the daemons recorded
there (by pid and start time), and nothing else.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from ... import exceptions as exc
from ...core import auth
from .files import StateDir

TOKEN_ENV = "BEAMLET_TOKEN"
ADDRESS_ENV = "BEAMLET_ADDRESS"
START_TIMEOUT = 60.0  # seconds a daemon may take to report that it is ready
STOP_TIMEOUT = 15.0  # seconds a daemon may take to stop after SIGTERM, before SIGKILL


def add_commands(sub) -> None:
    start = sub.add_parser("start", help="start a cluster node (--head for the first one)",
                           description="Start a cluster node in the background: the head "
                                       "(--head) or a node joining one (--address).",
                           epilog="A node whose connection drops is declared dead at once; "
                                  "a frozen or unreachable one after $BEAMLET_DEAD_AFTER "
                                  "seconds of silence (default 10; set it alike for every "
                                  "node and driver of the cluster).")
    role = start.add_mutually_exclusive_group(required=True)
    role.add_argument("--head", action="store_true", help="start the head node (and its Redis)")
    role.add_argument("--address", help="join the head at HOST:PORT")
    start.add_argument("--token", help=f"the cluster's token (default: ${TOKEN_ENV}, then the "
                                       f"cluster file of a head started on this machine); "
                                       f"with --head, restart a head under its old token so "
                                       f"that its nodes rejoin")
    start.add_argument("--port", type=int, default=0,
                       help="the one port this node listens on (default: a free one)")
    start.add_argument("--host", default="127.0.0.1",
                       help="the address to listen on (default 127.0.0.1; anything else is "
                            "reachable from other machines: a warning says so)")
    start.add_argument("--redis-address", help="a running Redis (HOST:PORT; its password in "
                                               "$BEAMLET_REDIS_PASSWORD) instead of starting one")
    start.add_argument("--num-cpus", type=float)
    start.add_argument("--num-gpus", type=float)
    start.add_argument("--resources", help='custom resources as JSON, e.g. \'{"disk": 4}\'')
    start.add_argument("--object-store-memory", type=int)
    start.set_defaults(func=cmd_start)

    stop = sub.add_parser("stop", help="stop the cluster processes this user started here",
                          description="Stop the beamlet daemons this user started on this "
                                      "machine (and nothing else).")
    stop.set_defaults(func=cmd_stop)

    status = sub.add_parser("status", help="show the cluster's nodes and resources",
                            description="Show the cluster's nodes, resources, actors, "
                                        "queued tasks and object-store use.")
    status.add_argument("--address", help=f"the head (default: ${ADDRESS_ENV}, then the "
                                          f"cluster started on this machine)")
    status.add_argument("--token", help=f"the cluster's token (default: ${TOKEN_ENV}, then "
                                        f"the cluster file)")
    status.set_defaults(func=cmd_status)


def _fail(message: str) -> int:
    print(f"beamlet: {message}", file=sys.stderr)
    return 1


def resolve(address: str | None, token: str | None, state: StateDir) -> tuple[str, bytes]:
    """The head's address and the cluster's secret: given, else from the
    environment, else from the cluster file of a head started here."""
    cluster = state.cluster()
    address = address or os.environ.get(ADDRESS_ENV) or (cluster or {}).get("address")
    if not address:
        raise exc.BackendError(f"no cluster address: give --address, set ${ADDRESS_ENV}, or "
                               f"start a head here with `beamlet start --head`")
    token = token or os.environ.get(TOKEN_ENV)
    if not token and cluster and cluster.get("address") == address:
        token = cluster.get("token")
    if not token:
        raise exc.BackendError(f"no token for the cluster at {address}: give --token or set "
                               f"${TOKEN_ENV} (`beamlet start --head` printed it)")
    return address, parse_token(token)


def parse_token(token: str) -> bytes:
    """The secret a printed token stands for; BackendError if it is not one."""
    try:
        return auth.check_secret(bytes.fromhex(token))
    except (ValueError, TypeError):
        raise exc.BackendError("the token is not the one `beamlet start --head` printed "
                               "(64 hex digits)") from None


def _daemon_argv(args) -> list[str]:
    argv = [sys.executable, "-m", "beamlet.backends.zmq.daemon", "--host", args.host,
            "--port", str(args.port)]
    if args.head:
        argv.append("--head")
    else:
        argv += ["--address", args.address]
    for flag in ("redis_address", "num_cpus", "num_gpus", "resources", "object_store_memory"):
        value = getattr(args, flag)
        if value is not None:
            argv += [f"--{flag.replace('_', '-')}", str(value)]
    return argv


def cmd_start(args) -> int:
    try:
        state = StateDir()
        if args.resources is not None:
            json.loads(args.resources)
        if args.head:
            # (--token: the token of a head that ran before, so its nodes rejoin.)
            secret = parse_token(args.token) if args.token else auth.new_secret()
        else:
            args.address, secret = resolve(args.address, args.token, state)
        report, proc = _launch(args, secret, state)
    except json.JSONDecodeError as err:
        return _fail(f"--resources is not JSON: {err}")
    except exc.BackendError as err:
        return _fail(str(err))
    token = secret.hex()
    if args.head:
        state.write_cluster(report["address"], token)
        if report.get("redis_pid"):
            state.record_process(report["redis_pid"], "redis", "")
        print(f"beamlet head started at {report['address']} (node {report['node_id']}).\n\n"
              f"Cluster token (keep it secret: it lets its holder run code on the cluster):\n"
              f"  {token}\n\n"
              f"Join a node (on this machine or another that can reach {report['address']}):\n"
              f"  beamlet start --address {report['address']} --token {token}\n\n"
              f"See the cluster:\n  beamlet status\n\nStop what you started here:\n"
              f"  beamlet stop")
    else:
        print(f"beamlet node {report['node_id']} joined the head at {args.address}; it "
              f"listens at {report['address']}.")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"beamlet: warning: listening on {args.host}, which other machines may reach; "
              f"only holders of the token are let in", file=sys.stderr)
    return 0


def _launch(args, secret: bytes, state: StateDir) -> tuple[dict, subprocess.Popen]:
    """Start the daemon and wait for its report; record it."""
    role = "head" if args.head else "node"
    log_path = state.log_path(role, f"{int(time.time())}-{os.getpid()}")
    with open(log_path, "ab") as log_file:
        os.chmod(log_path, 0o600)
        proc = subprocess.Popen(_daemon_argv(args), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=log_file,
                                start_new_session=True, close_fds=True)
    try:
        proc.stdin.write(secret.hex().encode() + b"\n")
        proc.stdin.close()
    except OSError:
        pass
    line = _read_line(proc, START_TIMEOUT)
    proc.stdout.close()
    try:
        report = json.loads(line) if line else None
    except ValueError:
        report = None
    if not report or not report.get("ok"):
        _end(proc.pid, proc)
        why = report.get("error") if report else f"it exited without a word (see {log_path})"
        raise exc.BackendError(f"the {role} did not start: {why}")
    state.record_process(proc.pid, role, report["address"])
    return report, proc


def _read_line(proc: subprocess.Popen, timeout: float) -> bytes:
    import selectors
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            return b""
        return proc.stdout.readline()
    finally:
        sel.close()


def _end(pid: int, proc: subprocess.Popen | None = None) -> None:
    """SIGTERM the process, SIGKILL it after `STOP_TIMEOUT`."""
    _signal_all([pid])
    _wait_ended([(pid, None, proc)])


def _signal_all(pids) -> None:
    """SIGTERM each of `pids` (gone ones are skipped)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def _wait_ended(targets) -> None:
    """Wait up to `STOP_TIMEOUT` for every ``(pid, start_time, proc)`` of
    `targets` to end (see `process_running`), then SIGKILL those left."""
    from .files import process_running

    def running(pid, start_time, proc):
        if proc is not None:
            return proc.poll() is None
        return process_running(pid, start_time)

    left = list(targets)
    until = time.monotonic() + STOP_TIMEOUT
    while left and time.monotonic() < until:
        left = [t for t in left if running(*t)]
        if left:
            time.sleep(0.02)
    for pid, start_time, proc in left:
        if running(pid, start_time, proc):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc is not None:
            proc.wait(5)


def cmd_stop(args) -> int:
    try:
        state = StateDir()
    except exc.BackendError as err:
        return _fail(str(err))
    # Nodes first (all at once), then the head, then its Redis.
    order = {"node": 0, "head": 1, "redis": 2}
    records = state.processes()
    for rank in sorted({order.get(r["role"], 0) for r in records}):
        batch = [r for r in records if order.get(r["role"], 0) == rank]
        _signal_all([r["pid"] for r in batch])
        _wait_ended([(r["pid"], r["start_time"], None) for r in batch])
        for record in sorted(batch, key=lambda r: r["pid"]):
            state.forget_process(record["pid"])
            print(f"stopped the {record['role']} (pid {record['pid']})")
    state.forget_cluster()
    if not records:
        print("no beamlet process of this user runs here")
    return 0


def status(address: str, secret: bytes, timeout: float = 10.0) -> list[dict]:
    """The head's view of the cluster: one dict per node."""
    from . import protocol as P
    from .transport import ZmqTransport
    transport = ZmqTransport(secret, P.VERSION, codec=P.CODEC)
    try:
        conn = transport.connect(address, timeout=timeout)
        try:
            conn.send(P.StatusRequest())
            reply = conn.recv(timeout=timeout)
        finally:
            conn.close()
    finally:
        transport.close()
    if type(reply) is not P.StatusReply:
        raise exc.BackendError(f"the head answered {P.describe(reply)} to a status request")
    return reply.nodes


def _resource(name: str, free, total: float, alive: bool) -> str:
    """'CPU 1.0/2.0' (available/total; memory in GiB); a dead node's total only."""
    scale, unit = (2 ** 30, " GiB") if name == "memory" else (1, "")
    shown = f"{total / scale:.1f}{unit}"
    if alive and free is not None:
        shown = f"{free / scale:.1f}/{shown}"
    return f"{name} {shown}"


def cmd_status(args) -> int:
    try:
        address, secret = resolve(args.address, args.token, StateDir())
        nodes = status(address, secret)
    except (exc.BackendError, ValueError) as err:  # (ValueError: $BEAMLET_DEAD_AFTER)
        return _fail(str(err))
    alive = [n for n in nodes if n["state"] == "ALIVE"]
    print(f"cluster at {address}: {len(alive)} node(s) alive, "
          f"{len(nodes) - len(alive)} dead")
    rows = [("NODE", "STATE", "ADDRESS", "RESOURCES (available/total)", "ACTORS", "QUEUED",
             "OBJECT STORE")]
    for node in nodes:
        total = node.get("resources", {})
        free = node.get("available", {})
        res = ", ".join(_resource(k, free.get(k), v, node["state"] == "ALIVE")
                        for k, v in sorted(total.items()) if v)
        store = (f"{node['store_bytes_used'] / 2**20:.1f}/{node['store_capacity'] / 2**20:.0f} MiB"
                 if "store_capacity" in node else "-")
        rows.append((node["node_id"] + (" (head)" if node.get("head") else ""), node["state"],
                     node["address"], res or "-", str(node.get("actors", "-")),
                     str(node.get("queued", "-")), store))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    return 0
