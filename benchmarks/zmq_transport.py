"""The ZeroMQ transport over loopback, between two processes (issue 7).

    python benchmarks/zmq_transport.py [--size-mb 100] [--repeat 5] [--pings 2000]

This process listens (its loop: select on `fileno`, then `poll`, as a node's
I/O loop does); a child process connects (the secret on its stdin) and
measures:

- round trip: a small message to the listener and its echo back (µs);
- a buffer of `--size-mb` MB moved child -> listener, as one message with the
  buffer out of band, and in 4 MiB and 8 MiB chunks (`transport.chunks`); the
  listener copies what arrives into a preallocated buffer (as it would into
  shared memory) and answers "ok"; the time is from the first send to the "ok";
- the same bytes moved listener -> child as a pull moves an object: the
  child asks, the listener sends `send_piece` pieces of 1 MiB (at most
  `objects.SEND_WINDOW` in flight, as a node serves a pull), the child
  decrypts each straight into its buffer (`Piece.read_into`);
- for reference, the same bytes over a plain TCP socket on loopback (sendall /
  recv_into), the machine's limit for one stream.

Each transfer's CPU time (getrusage: user + system, all threads) of both
processes together is reported per GB moved: on a shared machine it varies
far less with the load than the wall time.

Then how long the listener takes to report a peer `Left` once it is SIGKILLed
(its TCP connection closes at once) and once it is SIGSTOPped (only the
heartbeats find it). Prints one table; `--json` writes the figures.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import select
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

VERSION = "beamlet-bench/1"
PULL = "pull, 1 MiB pieces"


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def child(address: str, size: int, repeat: int, pings: int, pieces: list) -> None:
    import numpy as np

    from beamlet.backends.zmq.transport import ZmqTransport, chunks

    secret = bytes.fromhex(sys.stdin.readline().strip())
    transport = ZmqTransport(secret, VERSION)
    conn = transport.connect(address, timeout=30)
    out: dict = {}
    for i in range(200):  # warm up
        conn.send(i)
        conn.recv(timeout=30)
    rtts = []
    for i in range(pings):
        t0 = time.perf_counter()
        conn.send(i)
        conn.recv(timeout=30)
        rtts.append(time.perf_counter() - t0)
    out["rtt_us"] = {"median": statistics.median(rtts) * 1e6,
                     "p90": sorted(rtts)[int(0.9 * len(rtts))] * 1e6}
    data = np.random.default_rng(1).integers(0, 255, size=size, dtype=np.uint8)
    for name, chunk in pieces:
        times, cpus = [], []
        for _ in range(repeat):
            c0 = _cpu()
            t0 = time.perf_counter()
            if chunk is None:
                conn.send(("whole", data))
            else:
                conn.send(("size", size))
                for offset, piece in chunks(data, chunk):
                    conn.send(("chunk", offset, piece))
                conn.send(("end",))
            assert conn.recv(timeout=120) == "ok"
            times.append(time.perf_counter() - t0)
            cpus.append(_cpu() - c0)
        out[name] = times
        out[name + " cpu"] = cpus
    dest = np.empty(size, dtype=np.uint8)
    dest[:] = 0
    times, cpus = [], []
    for _ in range(repeat):
        c0 = _cpu()
        t0 = time.perf_counter()
        conn.send(("pull", size))
        got = 0
        while got < size:
            piece = conn.recv(timeout=120)
            offset = piece.header
            piece.read_into(dest[offset:offset + piece.nbytes])
            got += piece.nbytes
        times.append(time.perf_counter() - t0)
        cpus.append(_cpu() - c0)
        conn.send(("pulled",))
    assert bytes(dest[-1000:]) == bytes(data[-1000:])
    out[PULL], out[PULL + " cpu"] = times, cpus
    conn.send("stop")
    conn.close()
    transport.close()
    print(json.dumps(out), flush=True)


def serve(listener, until_stop, size: int) -> list:
    """The listener's loop: echo small messages, sink buffers. Returns its CPU
    seconds per transfer, in order."""
    import numpy as np

    from beamlet.backends.zmq.objects import SEND_WINDOW, _sent
    from beamlet.backends.zmq.transport import chunks

    dest = None
    cpus, c0 = [], 0.0
    source = np.random.default_rng(1).integers(0, 255, size=size, dtype=np.uint8)
    while True:
        select.select([listener], [], [], 0.2)
        for event in listener.poll():
            name = type(event).__name__
            if name == "Left":
                return cpus
            if name != "Received":
                continue
            for m in event.messages:
                if isinstance(m, int):
                    event.conn.send(m)
                elif m == "stop":
                    until_stop()
                elif m[0] == "whole":
                    c0 = _cpu()
                    if dest is None or dest.nbytes != m[1].nbytes:
                        dest = np.empty(m[1].nbytes, dtype=np.uint8)
                    np.copyto(dest, m[1])
                    cpus.append(_cpu() - c0)
                    event.conn.send("ok")
                elif m[0] == "size":
                    c0 = _cpu()
                    if dest is None or dest.nbytes != m[1]:
                        dest = np.empty(m[1], dtype=np.uint8)
                elif m[0] == "chunk":
                    dest[m[1]:m[1] + len(m[2])] = np.frombuffer(m[2], dtype=np.uint8)
                elif m[0] == "pull":
                    c0 = _cpu()
                    in_flight = collections.deque()  # (paced as a node's serve_pull is)
                    for offset, piece in chunks(source, 1 << 20):
                        if len(in_flight) >= SEND_WINDOW:
                            _sent(in_flight.popleft(), event.conn)
                        in_flight.append(event.conn.send_piece(offset, piece, track=True))
                elif m[0] == "pulled":
                    cpus.append(_cpu() - c0)
                elif m[0] == "end":
                    cpus.append(_cpu() - c0)
                    event.conn.send("ok")


def plain_tcp(size: int, repeat: int) -> list[float]:
    """Seconds to move `size` bytes over one loopback TCP connection to a child."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    code = (f"import socket,sys\ns=socket.create_connection(('127.0.0.1',{port}))\n"
            f"buf=bytearray({size})\nfor _ in range({repeat}):\n"
            f"    v=memoryview(buf); n=0\n"
            f"    while n<{size}:\n        n+=s.recv_into(v[n:])\n    s.sendall(b'k')\n")
    proc = subprocess.Popen([sys.executable, "-c", code])
    conn, _ = server.accept()
    data = os.urandom(size)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        conn.sendall(data)
        assert conn.recv(1) == b"k"
        times.append(time.perf_counter() - t0)
    conn.close()
    server.close()
    proc.wait(30)
    return times


def time_to_left(transport_secret: bytes, listener, how: str) -> float:
    code = ("import sys,time\nsys.path.insert(0, %r)\n"
            "from beamlet.backends.zmq.transport import ZmqTransport\n"
            "t=ZmqTransport(bytes.fromhex(sys.stdin.readline().strip()), %r)\n"
            "c=t.connect(%r, timeout=30)\nprint('JOINED', flush=True)\ntime.sleep(300)\n"
            % (str(REPO), VERSION, listener.address))
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    proc.stdin.write(transport_secret.hex() + "\n")
    proc.stdin.close()
    try:
        joined = False
        until = time.monotonic() + 60
        while not joined and time.monotonic() < until:
            select.select([listener], [], [], 0.2)
            joined = any(type(e).__name__ == "Joined" for e in listener.poll())
        assert proc.stdout.readline().startswith("JOINED")
        os.kill(proc.pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 30:
            select.select([listener], [], [], 0.2)
            if any(type(e).__name__ == "Left" for e in listener.poll()):
                return time.monotonic() - t0
        return float("nan")
    finally:
        proc.kill()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--pings", type=int, default=2000)
    parser.add_argument("--chunks", default="0,1024,4096",
                        help="piece sizes in KiB, comma-separated (0: the buffer as one message)")
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = args.size_mb * 1024 * 1024
    pieces = [("whole", None) if not int(k) else (f"chunks {int(k)} KiB", int(k) << 10)
              for k in args.chunks.split(",")]
    if args.child:
        child(args.child, size, args.repeat, args.pings, pieces)
        return

    from beamlet.backends.zmq.transport import ZmqTransport
    from beamlet.core import auth

    secret = auth.new_secret()
    transport = ZmqTransport(secret, VERSION)
    listener = transport.listen("127.0.0.1:0")
    proc = subprocess.Popen([sys.executable, __file__, "--child", listener.address,
                             "--size-mb", str(args.size_mb), "--repeat", str(args.repeat),
                             "--pings", str(args.pings), "--chunks", args.chunks],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    proc.stdin.write(secret.hex() + "\n")
    proc.stdin.close()
    listener_cpus = serve(listener, lambda: None, size)
    figures = json.loads(proc.stdout.read())
    for i, name in enumerate([name for name, _ in pieces] + [PULL]):  # (both processes')
        mine = listener_cpus[i * args.repeat:(i + 1) * args.repeat]
        figures[name + " cpu"] = [a + b for a, b in zip(figures[name + " cpu"], mine)]
    proc.wait(60)
    figures["plain TCP"] = plain_tcp(size, args.repeat)
    figures["left after SIGKILL (s)"] = time_to_left(secret, listener, "kill")
    figures["left after SIGSTOP (s)"] = time_to_left(secret, listener, "stop")
    transport.close()

    rtt = figures["rtt_us"]
    print(f"round trip, small message: median {rtt['median']:.0f} µs, p90 {rtt['p90']:.0f} µs")
    print(f"load average {os.getloadavg()[0]:.1f}")
    print(f"{args.size_mb} MB buffer, child -> listener (best / median of {args.repeat}; "
          f"CPU of both processes, median):")
    for name in [name for name, _ in pieces] + [PULL, "plain TCP"]:
        times = figures[name]
        cpu = figures.get(name + " cpu")
        per_gb = f"   {statistics.median(cpu) / (size / 1e9):5.2f} CPU s per GB" if cpu else ""
        print(f"  {name:16s} {size / min(times) / 1e9:5.2f} GB/s  /  "
              f"{size / statistics.median(times) / 1e9:5.2f} GB/s{per_gb}")
    for key in ("left after SIGKILL (s)", "left after SIGSTOP (s)"):
        print(f"{key[:-4]}: {figures[key]:.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
