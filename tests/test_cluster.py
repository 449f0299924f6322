"""The cluster's daemons and commands: ``beamlet start`` (head and nodes),
``beamlet status`` and ``beamlet stop``, as a user runs them.

Every test runs the real command line in subprocesses, with its own state
directory (``$BEAMLET_STATE_DIR``), so the daemons, their redis-server and
their sockets (ZeroMQ on 127.0.0.1) are real; the fixture stops what the
test started and checks that every process it recorded is gone.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys

import procs
import pytest

TIMEOUT = 90  # seconds any one command may take


def _node_lines(out: str) -> dict[str, str]:
    """node id -> its line of `beamlet status`."""
    return {m.group(1): line for line in out.splitlines()
            if (m := re.match(r"(node-[0-9a-f]{16})", line))}


class Cluster:
    """Runs `beamlet` commands with a private state directory."""

    def __init__(self, state_dir: str):
        self.state_dir = state_dir
        self.env = dict(os.environ, BEAMLET_STATE_DIR=state_dir,
                        PYTHONPATH=os.pathsep.join([str(procs.REPO)] + [
                            p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        self.env.pop("BEAMLET_TOKEN", None)
        self.env.pop("BEAMLET_ADDRESS", None)
        self.seen: set = set()  # (pid, start time) of every daemon recorded

    def run(self, *args: str, env: dict | None = None, check: bool = True):
        proc = subprocess.run([sys.executable, "-m", "beamlet.cli", *args],
                              env={**self.env, **(env or {})}, capture_output=True, text=True,
                              timeout=TIMEOUT)
        self.note_processes()
        if check:
            assert proc.returncode == 0, f"beamlet {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
        return proc

    def processes(self) -> list[dict]:
        """The records of daemons that run (a record may outlive its process)."""
        directory = os.path.join(self.state_dir, "processes")
        out = []
        for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
            try:
                with open(os.path.join(directory, name)) as f:
                    record = json.load(f)
            except FileNotFoundError:
                continue  # (removed as we looked)
            if procs.alive((record["pid"], record["start_time"])):
                out.append(record)
        return out

    def note_processes(self) -> None:
        for record in self.processes():
            self.seen.add((record["pid"], record["start_time"]))

    def start_head(self, *extra: str) -> dict:
        out = self.run("start", "--head", "--num-cpus", "1", *extra).stdout
        address = re.search(r"head started at (\S+) \(node (node-[0-9a-f]+)\)", out)
        token = re.search(r"^\s+([0-9a-f]{64})$", out, re.M)
        assert address and token, out
        assert f"beamlet start --address {address.group(1)} --token {token.group(1)}" in out
        return {"address": address.group(1), "node_id": address.group(2),
                "token": token.group(1), "out": out}

    def join(self, head: dict, *extra: str, via_env: bool = False) -> str:
        args = ["start", "--address", head["address"], "--num-cpus", "1", *extra]
        if via_env:
            out = self.run(*args, env={"BEAMLET_TOKEN": head["token"]}).stdout
        else:
            out = self.run(*args, "--token", head["token"]).stdout
        node = re.search(r"beamlet node (node-[0-9a-f]+) joined", out)
        assert node, out
        return node.group(1)

    def status(self) -> str:
        return self.run("status").stdout

    def pid_of(self, node_line_address: str) -> int:
        for record in self.processes():
            if record["address"] == node_line_address:
                return record["pid"]
        raise AssertionError(f"no process recorded at {node_line_address}: {self.processes()}")


@pytest.fixture
def cluster(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: the head starts one (apt-get install "
                    "redis-server)")
    state = tmp_path / "state"
    c = Cluster(str(state))
    try:
        yield c
    finally:
        c.run("stop", check=False)
        left = [pid for pid, started in c.seen if procs.alive((pid, started))]
        assert not left, f"processes left running after beamlet stop: {left}"


def test_a_head_and_two_nodes_with_their_own_resources(cluster):
    head = cluster.start_head("--resources", '{"head_disk": 1}')
    first = cluster.join(head, "--resources", '{"gpu_box": 1}')
    second = cluster.join(head, "--resources", '{"ssd": 2}', via_env=True)
    out = cluster.status()
    assert "3 node(s) alive, 0 dead" in out, out
    lines = _node_lines(out)
    assert set(lines) == {head["node_id"], first, second}, out
    assert "(head)" in lines[head["node_id"]] and "head_disk" in lines[head["node_id"]]
    assert "gpu_box 1.0/1.0" in lines[first] and "ssd" not in lines[first], out
    assert "ssd 2.0/2.0" in lines[second] and "gpu_box" not in lines[second], out
    for line in lines.values():
        assert " ALIVE " in line and "CPU 1.0/1.0" in line and "MiB" in line, line


def test_the_token_is_kept_private(cluster):
    head = cluster.start_head()
    cluster.join(head)
    cluster_file = os.path.join(cluster.state_dir, "cluster.json")
    assert stat.S_IMODE(os.stat(cluster.state_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(cluster_file).st_mode) == 0o600
    with open(cluster_file) as f:
        assert json.load(f) == {"address": head["address"], "token": head["token"]}
    records = cluster.processes()
    assert {r["role"] for r in records} == {"head", "node", "redis"}, records
    for record in records:
        for what in ("cmdline", "environ"):
            with open(f"/proc/{record['pid']}/{what}", "rb") as f:
                assert head["token"].encode() not in f.read(), (record, what)


def test_a_killed_node_is_declared_dead_and_the_rest_go_on(cluster):
    head = cluster.start_head()
    doomed = cluster.join(head)
    survivor = cluster.join(head)
    address = _node_lines(cluster.status())[doomed].split()[2]
    os.kill(cluster.pid_of(address), signal.SIGKILL)

    def doomed_is_dead():
        lines = _node_lines(cluster.status())
        return " DEAD " in lines[doomed] and " ALIVE " in lines[survivor]

    # The head sees its connection drop at once; its heartbeats stop too.
    assert procs.wait_until(doomed_is_dead, 30, interval=0.5), cluster.status()
    assert "2 node(s) alive, 1 dead" in cluster.status()


def test_a_frozen_node_is_declared_dead_and_comes_back_as_a_new_node(cluster):
    """A node that stops answering (SIGSTOP: frozen, or cut off) is declared
    dead once silent for ``BEAMLET_DEAD_AFTER`` seconds (5 here, which the
    daemons inherit; the default, 10 s, is the transport tests'). Running
    again, it finds its connection to the head gone and rejoins under a new
    id: a node declared dead never comes back under its old one."""
    cluster.env["BEAMLET_DEAD_AFTER"] = "5"
    head = cluster.start_head()
    frozen = cluster.join(head)
    pid = cluster.pid_of(_node_lines(cluster.status())[frozen].split()[2])
    os.kill(pid, signal.SIGSTOP)
    try:
        assert procs.wait_until(lambda: " DEAD " in _node_lines(cluster.status())[frozen], 60,
                                interval=0.5), cluster.status()
    finally:
        os.kill(pid, signal.SIGCONT)

    def rejoined():  # (under another id; on a loaded machine, maybe not the first new one)
        lines = _node_lines(cluster.status())
        return " DEAD " in lines[frozen] and any(
            " ALIVE " in line for node, line in lines.items() if node not in (head["node_id"],
                                                                            frozen))

    assert procs.wait_until(rejoined, 60, interval=0.5), cluster.status()
    assert [r["pid"] for r in cluster.processes() if r["role"] == "node"] == [pid]


def test_a_wrong_token_is_refused_at_once(cluster):
    head = cluster.start_head()
    wrong = "ab" * 32
    joined = cluster.run("start", "--address", head["address"], "--token", wrong, check=False)
    assert joined.returncode == 1
    assert "did not start" in joined.stderr and "refused" in joined.stderr, joined.stderr
    looked = cluster.run("status", "--token", wrong, check=False)
    assert looked.returncode == 1 and "refused" in looked.stderr, looked.stderr
    not_a_token = cluster.run("status", "--token", "xyz", check=False)
    assert not_a_token.returncode == 1 and "64 hex digits" in not_a_token.stderr
    out = cluster.status()  # the head is unharmed, and no node joined
    assert "1 node(s) alive, 0 dead" in out, out
    assert {r["role"] for r in cluster.processes()} == {"head", "redis"}


def test_commands_without_a_cluster_say_what_to_do(cluster):
    looked = cluster.run("status", check=False)
    assert looked.returncode == 1 and "beamlet start --head" in looked.stderr, looked.stderr
    joined = cluster.run("start", "--address", "127.0.0.1:1", "--token", "ab" * 32, check=False)
    assert joined.returncode == 1 and "did not start" in joined.stderr, joined.stderr
    stopped = cluster.run("stop")
    assert "no beamlet process" in stopped.stdout
    bad = cluster.run("start", "--head", "--resources", "{nope", check=False)
    assert bad.returncode == 1 and "--resources is not JSON" in bad.stderr
    no_redis = cluster.run("start", "--head", "--redis-address", "127.0.0.1:1", check=False)
    assert no_redis.returncode == 1 and "127.0.0.1:1" in no_redis.stderr, no_redis.stderr
    for command in (["start", "--head"],
                    ["status", "--address", "127.0.0.1:1", "--token", "ab" * 32]):
        silly = cluster.run(*command, env={"BEAMLET_DEAD_AFTER": "0"}, check=False)
        assert silly.returncode == 1 and "beamlet: " in silly.stderr and \
            "BEAMLET_DEAD_AFTER must be" in silly.stderr and "Traceback" not in silly.stderr, \
            silly.stderr
    assert cluster.processes() == []


def test_stop_ends_what_start_started_and_nothing_else(cluster):
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        head = cluster.start_head()
        cluster.join(head)
        started = [(r["pid"], r["start_time"]) for r in cluster.processes()]
        assert len(started) == 3
        out = cluster.run("stop").stdout
        assert out.count("stopped the") == 3, out
        assert all(not procs.alive(p) for p in started), out
        assert cluster.processes() == []
        assert not os.path.exists(os.path.join(cluster.state_dir, "cluster.json"))
        assert bystander.poll() is None  # a process of the same user, not ours to stop
    finally:
        bystander.kill()
        bystander.wait(10)


def test_a_state_directory_others_can_read_is_refused(cluster):
    os.makedirs(cluster.state_dir, mode=0o755)
    os.chmod(cluster.state_dir, 0o755)
    started = cluster.run("start", "--head", check=False)
    assert started.returncode == 1 and "chmod 700" in started.stderr, started.stderr
    assert cluster.processes() == []


def test_nodes_rejoin_a_restarted_head(cluster):
    head = cluster.start_head()
    member = cluster.join(head)
    port = head["address"].rsplit(":", 1)[1]
    head_pid = next(r["pid"] for r in cluster.processes() if r["role"] == "head")
    os.kill(head_pid, signal.SIGTERM)  # (it stops its Redis with it)
    assert procs.wait_until(lambda: not any(r["role"] == "head" for r in cluster.processes()),
                            30), cluster.processes()
    again = cluster.run("start", "--head", "--port", port, "--token", head["token"]).stdout
    assert f"head started at {head['address']}" in again, again

    def member_back():
        lines = _node_lines(cluster.status())
        return len(lines) == 2 and all(" ALIVE " in line for line in lines.values())

    # It rejoins as a new node: a node declared dead never comes back under its id.
    assert procs.wait_until(member_back, 30, interval=0.5), cluster.status()
    assert member not in _node_lines(cluster.status())
    assert len([r for r in cluster.processes() if r["role"] == "node"]) == 1


def test_the_cluster_carries_on_when_its_redis_dies(cluster):
    head = cluster.start_head()
    member = cluster.join(head)
    redis = next(r for r in cluster.processes() if r["role"] == "redis")
    os.kill(redis["pid"], signal.SIGKILL)

    def redis_back():
        records = [r for r in cluster.processes() if r["role"] == "redis"]
        return len(records) == 1 and records[0]["pid"] != redis["pid"]

    # The head starts it again on its data (AOF); the nodes table is still there.
    assert procs.wait_until(redis_back, 30, interval=0.2), cluster.processes()
    lines = _node_lines(cluster.status())
    assert set(lines) == {head["node_id"], member}, lines
    assert all(" ALIVE " in line for line in lines.values()), lines
    later = cluster.join(head)  # and it takes new nodes
    assert "3 node(s) alive" in cluster.status()
    assert later in _node_lines(cluster.status())


# -- separate network namespaces: a head and a node with addresses of their own ----------
def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def two_namespaces():
    """Two network namespaces made for the test, joined by a veth pair:
    ``{"head": (namespace, "10.a.b.1"), "node": (namespace, "10.a.b.2")}``.
    Fails (never skips) where namespaces cannot be made: this project's
    machines allow them to root, and a skip would hide that the test never
    ran. Deleted after the test (their veth ends go with them)."""
    if shutil.which("ip") is None:
        pytest.fail("this test needs iproute2's `ip` (apt-get install iproute2)")
    tag = secrets.token_hex(3)
    names = [f"beamlet-{tag}-head", f"beamlet-{tag}-node"]
    veths = [f"bt{tag}h", f"bt{tag}n"]
    subnet = f"10.{secrets.randbelow(200) + 50}.{secrets.randbelow(256)}"
    made = []
    try:
        for name in names:
            proc = _ip("netns", "add", name)
            if proc.returncode != 0:
                pytest.fail(f"cannot make a network namespace (`ip netns add {name}`: "
                            f"{proc.stderr.strip()}): this test needs root and namespaces")
            made.append(name)
        steps = [("link", "add", veths[0], "type", "veth", "peer", "name", veths[1])]
        for name, veth, host in zip(names, veths, ("1", "2")):
            steps += [("link", "set", veth, "netns", name),
                      ("-n", name, "addr", "add", f"{subnet}.{host}/30", "dev", veth),
                      ("-n", name, "link", "set", veth, "up"),
                      ("-n", name, "link", "set", "lo", "up")]
        for step in steps:
            proc = _ip(*step)
            assert proc.returncode == 0, f"ip {' '.join(step)}: {proc.stderr}"
        yield {"head": (names[0], f"{subnet}.1"), "node": (names[1], f"{subnet}.2")}
    finally:
        for name in made:
            _ip("netns", "delete", name)
        _ip("link", "delete", veths[0])  # (gone with its namespace, unless moving it failed)


NETNS_DRIVER = """
import sys
import numpy as np
import beamlet

beamlet.init(address=sys.argv[1], token=sys.argv[2])


@beamlet.remote(resources={"near": 1})
def make_near(n):
    return beamlet.get_runtime_context().get_node_id(), np.arange(n, dtype=np.int64)


@beamlet.remote(resources={"far": 1})
def make_far(n):
    return np.arange(n, dtype=np.int64)


@beamlet.remote(resources={"far": 1})
def use_far(pair):
    return beamlet.get_runtime_context().get_node_id(), int(pair[1].sum())


n = 1 << 20  # 8 MB: pulled from store to store, not sent inline
pair = make_near.remote(n)
print("near", beamlet.get(pair, timeout=120)[0])
print("far", *beamlet.get(use_far.remote(pair), timeout=120))
print("pulled", int(beamlet.get(make_far.remote(n), timeout=120).sum()))
beamlet.shutdown()
"""


def test_a_head_and_a_node_in_separate_network_namespaces(two_namespaces, cluster, tmp_path):
    (head_ns, head_ip), (node_ns, node_ip) = two_namespaces["head"], two_namespaces["node"]

    def in_namespace(namespace: str, *args: str) -> str:
        proc = subprocess.run(["ip", "netns", "exec", namespace, sys.executable, *args],
                              env=cluster.env, capture_output=True, text=True, timeout=TIMEOUT)
        cluster.note_processes()
        assert proc.returncode == 0, f"{args}:\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    out = in_namespace(head_ns, "-m", "beamlet.cli", "start", "--head", "--host", head_ip,
                       "--num-cpus", "1", "--resources", '{"near": 1}')
    head = re.search(r"head started at (\S+) \(node (node-[0-9a-f]+)\)", out)
    token = re.search(r"^\s+([0-9a-f]{64})$", out, re.M)
    assert head and token and head.group(1).startswith(f"{head_ip}:"), out
    out = in_namespace(node_ns, "-m", "beamlet.cli", "start", "--address", head.group(1),
                       "--token", token.group(1), "--host", node_ip, "--num-cpus", "1",
                       "--resources", '{"far": 1}')
    node = re.search(r"beamlet node (node-[0-9a-f]+) joined", out)
    assert node and f"it listens at {node_ip}:" in out, out
    script = tmp_path / "driver.py"
    script.write_text(NETNS_DRIVER)
    out = in_namespace(head_ns, str(script), head.group(1), token.group(1))
    total = (1 << 20) * ((1 << 20) - 1) // 2
    assert f"near {head.group(2)}\n" in out, out
    assert f"far {node.group(1)} {total}\n" in out, out  # (moved head -> node)
    assert f"pulled {total}\n" in out, out  # (node -> the driver, beside the head)
