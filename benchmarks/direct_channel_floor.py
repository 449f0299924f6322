"""The floor of a direct caller -> actor-worker channel (issue 7): what one
sync actor call costs on the wire alone, over libzmq and over plain TCP.

    python benchmarks/direct_channel_floor.py --rounds 3 --calls 5000

Two processes on loopback: a caller sends a call (a TaskSpec's fields,
pickled and sealed with AES-256-GCM exactly as the cluster's transport seals
a message: `_Sealer.seal_one`), the worker opens it, unpickles the spec and
sends a small result back (sealed too), one call at a time. Two channels:

- ``zmq``: a DEALER connected to a ROUTER, as a driver talks to a node today;
  each message passes libzmq's I/O thread on both sides (four thread
  wake-ups per call on top of the two programs' own);
- ``tcp``: one TCP connection, length-prefixed frames written and read by the
  caller's and the worker's own threads (two wake-ups per call).

No handshake is timed (both ends start with the same keys). Rows: wall time
per call (median and p10 over the calls of a run) and CPU per call of each
process, all its threads (getrusage), the median over `--rounds` alternating
runs. Writes `results/direct-channel-floor-<date>.json`.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pickle
import resource
import select
import socket
import statistics
import struct
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

_HEAD = struct.Struct("<I")
_UP, _DOWN = b"u" * 32, b"d" * 32  # (fixed keys: the handshake is not what is measured)
WARMUP = 200


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _read_exactly(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise EOFError("the peer closed the connection")
        got += k
    return buf


def _result_of(spec) -> bytes:
    """A Done-like result of a no-op call: (tag, task id, [(id, value, error?)], retryable)."""
    return pickle.dumps((1, spec.task_id, [(spec.return_ids[0], b"\x80\x05N.", False)], False),
                        5)


def worker(mode: str, calls: int, ready_fd: int) -> None:
    """Serve `calls` calls (after `WARMUP` more); the port, then the CPU seconds
    of the timed ones, go to `ready_fd`."""
    import zmq

    from beamlet.backends.zmq.transport import _Opener, _Sealer
    from beamlet.core.task_spec import TaskSpec
    sealer, opener = _Sealer(_DOWN), _Opener(_UP)
    if mode == "zmq":
        ctx = zmq.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.RCVTIMEO, 30000)
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        os.write(ready_fd, f"{port}\n".encode())
        for i in range(calls + WARMUP):
            if i == WARMUP:
                start = _cpu()
            rid, frame = sock.recv_multipart(copy=False)
            spec = TaskSpec(*opener.message_one(frame, 1 << 30))
            sock.send_multipart([rid.bytes, sealer.seal_one(_result_of(spec))])
        cpu = _cpu() - start
        sock.close(0)
        ctx.term()
    else:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        os.write(ready_fd, f"{listener.getsockname()[1]}\n".encode())
        listener.settimeout(30)
        conn, _ = listener.accept()
        listener.close()
        conn.settimeout(30)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(calls + WARMUP):
            if i == WARMUP:
                start = _cpu()
            (size,) = _HEAD.unpack(_read_exactly(conn, _HEAD.size))
            spec = TaskSpec(*opener.message_one(_read_exactly(conn, size), 1 << 30))
            sealed = sealer.seal_one(_result_of(spec))
            conn.sendall(_HEAD.pack(len(sealed)) + sealed)
        cpu = _cpu() - start
        conn.close()
    os.write(ready_fd, f"{json.dumps(cpu)}\n".encode())


def caller(mode: str, port: int, calls: int) -> dict:
    import zmq

    from beamlet.backends.zmq.transport import _Opener, _Sealer
    from beamlet.core.ids import new_id
    from beamlet.core.task_spec import ACTOR_METHOD, TaskSpec
    sealer, opener = _Sealer(_UP), _Opener(_DOWN)
    if mode == "zmq":
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.RCVTIMEO, 30000)  # (a dead worker: zmq.Again, not a hang)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"tcp://127.0.0.1:{port}")

        def send(data):
            sock.send(data)

        def recv():
            return sock.recv(copy=False)
    else:
        ctx = None
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def send(data):
            sock.sendall(_HEAD.pack(len(data)) + data)

        def recv():
            return _read_exactly(sock, _HEAD.unpack(_read_exactly(sock, _HEAD.size))[0])
    actor_id, caller_id, function_id = new_id(), new_id(), new_id()
    times = []
    for i in range(calls):
        if i == WARMUP:
            start = _cpu()
        began = time.perf_counter()
        spec = TaskSpec(new_id(), ACTOR_METHOD, function_id, "Actor.m", [], {}, (new_id(),),
                        {}, 0, False, actor_id, "m", None, caller_id)
        send(sealer.seal_one(pickle.dumps(spec.fields(), 5)))
        opener.message_one(recv(), 1 << 30)
        times.append(time.perf_counter() - began)
    cpu = _cpu() - start
    sock.close()
    if ctx is not None:
        ctx.term()
    times = sorted(times[WARMUP:])
    n = calls - WARMUP
    return {"median_us": times[n // 2] * 1e6, "p10_us": times[n // 10] * 1e6,
            "caller_cpu_us": cpu / n * 1e6}


def _line(stream, timeout: float) -> str:
    """The worker's next line on `stream`, or "" if none comes within `timeout` seconds."""
    if not select.select([stream], [], [], timeout)[0]:
        return ""
    return stream.readline()


def run(mode: str, calls: int) -> dict:
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", mode,
                             "--calls", str(calls - WARMUP),
                             "--ready-fd", str(write_fd)], pass_fds=(write_fd,))
    os.close(write_fd)
    try:
        with os.fdopen(read_fd) as ready:
            port = int(_line(ready, 60) or 0)
            if not port:
                raise RuntimeError(f"the {mode} worker did not start")
            result = caller(mode, port, calls)
            line = _line(ready, 60)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if not line:
        raise RuntimeError(f"the {mode} worker exited with {proc.returncode}")
    result["worker_cpu_us"] = json.loads(line) / (calls - WARMUP) * 1e6
    result["load"] = os.getloadavg()[0]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--serve", choices=("zmq", "tcp"), help=argparse.SUPPRESS)
    parser.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    calls = args.calls + WARMUP
    if args.serve:
        worker(args.serve, args.calls, args.ready_fd)
        return 0
    runs: dict[str, list] = {"zmq": [], "tcp": []}
    for r in range(args.rounds):
        for mode in (("zmq", "tcp") if r % 2 == 0 else ("tcp", "zmq")):
            result = run(mode, calls)
            runs[mode].append(result)
            print(f"round {r} {mode}: " + ", ".join(f"{k} {v:.1f}" for k, v in result.items()),
                  flush=True)
    keys = ("median_us", "p10_us", "caller_cpu_us", "worker_cpu_us")
    print(f"\nOne sealed call and its result, {args.calls} calls per run, median of "
          f"{args.rounds} runs (load {os.getloadavg()[0]:.1f})")
    print(f"{'channel':<10}{'wall median':>14}{'wall p10':>12}{'caller CPU':>13}"
          f"{'worker CPU':>13}")
    for mode, results in runs.items():
        med = {k: statistics.median(x[k] for x in results) for k in keys}
        print(f"{mode:<10}{med['median_us']:>11.1f} us{med['p10_us']:>9.1f} us"
              f"{med['caller_cpu_us']:>10.1f} us{med['worker_cpu_us']:>10.1f} us")
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    with open(os.path.join(HERE, "results", f"direct-channel-floor-{stamp}.json"), "w") as f:
        json.dump({"args": {"rounds": args.rounds, "calls": args.calls}, "runs": runs}, f,
                  indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
