"""Ways to move bulk bytes between two processes over ZeroMQ on loopback,
compared in one run (issue 7's transfer target: 100 MB at >= 1 GB/s).

    python benchmarks/transfer_candidates.py [--size-mb 100] [--repeat 3] [--json FILE]

Raw pyzmq, no beamlet code: a DEALER (child process) sends `--size-mb` MB in
1 MiB pieces to a ROUTER (this process), which copies each piece into a
preallocated buffer and answers once all arrived. Candidates:

- ``curve``: both sockets CURVE (what the transport used), one connection;
- ``curve x4 (2 io threads)``: the same bytes over four CURVE connections,
  contexts with two I/O threads each (can CURVE be parallelised on 2 cores?);
- ``null``: the NULL mechanism (no security), the ceiling;
- ``null + hmac-sha256``: NULL, each piece authenticated by the sender
  (``hmac.digest``) and checked by the receiver before it is used;
- ``null + aes-256-gcm``: NULL, each piece encrypted and authenticated with
  AES-256-GCM (``cryptography``: OpenSSL), decrypted by the receiver;
- ``... (freed buffers kept)``: CURVE and NULL + AES-256-GCM again, with
  glibc told to keep freed buffers of up to 4 MiB for reuse (``mallopt``,
  as the transport does) in both processes, run last since it stays set:
  on this VM a fresh page costs more than encrypting it.

Prints GB/s (best and median of `--repeat`) and the CPU seconds per GB of
both processes together (getrusage: user + system, which load skews less
than wall time).
"""
from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import resource
import statistics
import subprocess
import sys
import time

PIECE = 1 << 20
KEY = bytes(range(32))  # (a benchmark: both ends know it)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _socket(ctx, kind, mode, keys, server):
    import zmq
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    if mode.startswith("curve"):
        spub, ssec, cpub, csec = keys
        if server:
            sock.curve_server = True
            sock.curve_secretkey = ssec
        else:
            sock.curve_serverkey = spub
            sock.curve_publickey, sock.curve_secretkey = cpub, csec
    return sock


def _seal(mode, seq, piece):
    if mode.startswith("null + hmac-sha256"):
        return [seq.to_bytes(8, "little"), piece, hmac.digest(KEY, seq.to_bytes(8, "little")
                                                              + piece, hashlib.sha256)]
    if mode.startswith("null + aes-256-gcm"):
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        return [seq.to_bytes(8, "little"),
                _AEAD.setdefault(0, AESGCM(KEY)).encrypt(seq.to_bytes(12, "little"), piece, b"")]
    return [seq.to_bytes(8, "little"), piece]


_AEAD: dict = {}


def _keep_freed_buffers() -> None:
    import ctypes
    mallopt = ctypes.CDLL(None).mallopt
    mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD
    mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD


def _open(mode, frames):
    seq = int.from_bytes(frames[0], "little")
    if mode.startswith("null + hmac-sha256"):
        data = frames[1].buffer
        mac = hmac.digest(KEY, frames[0].bytes + data, hashlib.sha256)
        if not hmac.compare_digest(mac, frames[2].bytes):
            raise ValueError("a piece that does not authenticate")
        return seq, data
    if mode.startswith("null + aes-256-gcm"):
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        aead = _AEAD.setdefault(0, AESGCM(KEY))
        return seq, aead.decrypt(seq.to_bytes(12, "little"), frames[1].buffer, b"")
    return seq, frames[1].buffer


def child(mode: str, ports: list, keys, size: int, repeat: int) -> None:
    import numpy as np
    import zmq
    nconn = len(ports)
    if "kept" in mode:
        _keep_freed_buffers()
    ctx = zmq.Context(io_threads=2 if nconn > 1 else 1)
    socks = []
    for port in ports:
        s = _socket(ctx, zmq.DEALER, mode, keys, server=False)
        s.connect(f"tcp://127.0.0.1:{port}")
        socks.append(s)
    for s in socks:
        s.send(b"hello")
    for s in socks:
        s.recv()
    data = np.random.default_rng(1).integers(0, 255, size=size, dtype=np.uint8)
    view = memoryview(data)
    cpu0 = _cpu()
    for _ in range(repeat):
        for seq, offset in enumerate(range(0, size, PIECE)):
            socks[seq % nconn].send_multipart(_seal(mode, offset, view[offset:offset + PIECE]),
                                             copy=False)
        socks[0].recv()
    print(json.dumps({"cpu": _cpu() - cpu0}), flush=True)
    for s in socks:
        s.close(linger=1000)
    ctx.term()


def run(mode: str, nconn: int, size: int, repeat: int) -> dict:
    import numpy as np
    import zmq
    keys = None
    if "kept" in mode:
        _keep_freed_buffers()
    if mode.startswith("curve"):
        spub, ssec = zmq.curve_keypair()
        cpub, csec = zmq.curve_keypair()
        keys = (spub, ssec, cpub, csec)
    ctx = zmq.Context(io_threads=2 if nconn > 1 else 1)
    router = _socket(ctx, zmq.ROUTER, mode, keys, server=True)
    ports = [router.bind_to_random_port("tcp://127.0.0.1")]
    # several connections: the same ROUTER, connected to several times (one port)
    ports = ports * nconn
    proc = subprocess.Popen([sys.executable, __file__, "--child", mode, json.dumps(ports),
                             json.dumps([k.decode() for k in keys] if keys else None),
                             str(size), str(repeat)], stdout=subprocess.PIPE, text=True)
    rids = []
    for _ in range(nconn):
        rid, _hello = router.recv_multipart()
        rids.append(rid)
    dest = np.empty(size, dtype=np.uint8)
    dest[:] = 0  # (mapped before the clock starts)
    times = []
    cpu0 = _cpu()
    for r in range(repeat):
        for rid in rids:
            router.send_multipart([rid, b"go"])
        t0 = time.perf_counter()
        got = 0
        while got < size:
            frames = router.recv_multipart(copy=False)
            offset, piece = _open(mode, frames[1:])
            n = len(piece)
            dest[offset:offset + n] = np.frombuffer(piece, dtype=np.uint8)
            got += n
        times.append(time.perf_counter() - t0)
    cpu = _cpu() - cpu0
    router.send_multipart([rids[0], b"done"])
    out = json.loads(proc.stdout.readline())
    proc.wait(60)
    cpu += out["cpu"]
    router.close(0)
    ctx.term()
    return {"times": times, "cpu_s_per_gb": cpu / (size * repeat / 1e9)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, ports, keys, size, repeat = args.child
        keys = json.loads(keys)
        child(mode, json.loads(ports), tuple(k.encode() for k in keys) if keys else None,
              int(size), int(repeat))
        return
    size = args.size_mb * 1024 * 1024
    results = {}
    for name, mode, nconn in [("curve", "curve", 1), ("curve x4 (2 io threads)", "curve", 4),
                              ("null", "null", 1),
                              ("null + hmac-sha256", "null + hmac-sha256", 1),
                              ("null + aes-256-gcm", "null + aes-256-gcm", 1),
                              ("curve (freed buffers kept)", "curve kept", 1),
                              ("null + aes-256-gcm (freed buffers kept)",
                               "null + aes-256-gcm kept", 1)]:
        results[name] = run(mode, nconn, size, args.repeat)
    print(f"load average {os.getloadavg()[0]:.1f}; {args.size_mb} MB in 1 MiB pieces, "
          f"best / median of {args.repeat}:")
    for name, r in results.items():
        t = r["times"]
        print(f"  {name:40s} {size / min(t) / 1e9:5.2f} / {size / statistics.median(t) / 1e9:5.2f}"
              f" GB/s   {r['cpu_s_per_gb']:.2f} CPU s per GB (both processes)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"load": os.getloadavg()[0], "size_mb": args.size_mb, **results}, f,
                      indent=1)


if __name__ == "__main__":
    main()
