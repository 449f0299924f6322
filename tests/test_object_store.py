"""The local backend's shared-memory object store, as an attacker and as faults
see it: segment names nobody can guess or take first, private files, room made
within ``object_store_memory`` for what workers write, nothing left behind by
a worker killed while writing, and the sweep of sessions whose processes were
all killed at once (while live sessions are left alone).

Real processes and real kills: workers are SIGKILLed by pid (their own, or
pids the backend reports), drivers are subprocesses (``procs.Driver``).
Waits poll with deadlines; no test asserts a timing.
"""
from __future__ import annotations

import gc
import os
import re
import secrets
import signal
import socket
import stat
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import beamlet as ray
from beamlet import exceptions as exc
from beamlet.backends.local import session as sessions
from beamlet.backends.local import shm

import procs

MB = 1_000_000
SUBPROCESS_TIMEOUT = 60


def _mode(path: str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)



@ray.remote
def make_array(n, value):
    return np.full(n, value, dtype=np.float64)


# ====================================================================================
# names and files
# ====================================================================================
def test_segment_names_are_random_and_files_private(start):
    backend = start()
    assert re.fullmatch(r"[0-9a-f]{16}", backend.session), backend.session
    refs = [ray.put(np.full(MB // 4, float(i))) for i in range(3)]
    refs += [make_array.remote(MB // 4, float(i)) for i in range(3)]
    values = ray.get(refs, timeout=30)
    names = {os.path.basename(procs.shm_mapping_of(v)) for v in values}
    assert len(names) == len(refs)
    prefix = f"beamlet-{backend.session}-"
    for name in names:
        assert name.startswith(prefix), name
        assert re.fullmatch(r"[0-9a-f]{32}", name[len(prefix):]), name
        for ref in refs:
            assert ref.hex() not in name and ref.hex()[:16] not in name
        assert _mode(shm.segment_path(name)) == 0o600
    # The temp dir is made fresh and private; the lock file names it.
    assert os.path.basename(backend.temp_dir).startswith(prefix)
    assert _mode(backend.temp_dir) == 0o700
    lock = procs.lock_file(backend.session)
    assert _mode(lock) == 0o600
    with open(lock) as f:
        assert f.read() == backend.temp_dir
    del values


def test_a_taken_segment_name_is_retried_with_a_fresh_one(tmp_path):
    session = secrets.token_hex(8)
    names = shm.fresh_names(session)
    taken, symlinked, fresh = next(names), next(names), next(names)
    victim = tmp_path / "victim"
    victim.write_bytes(b"not yours")
    # Another user got there first: a file, and a symlink to a file of ours.
    fd = os.open(shm.segment_path(taken), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    os.write(fd, b"someone else's")
    os.close(fd)
    os.symlink(victim, shm.segment_path(symlinked))
    try:
        got = shm.create_unmapped(session, 4096, iter([taken, symlinked, fresh]))
        assert got == fresh
        assert os.stat(shm.segment_path(fresh)).st_size == 4096
        assert _mode(shm.segment_path(fresh)) == 0o600
        with open(shm.segment_path(taken), "rb") as f:
            assert f.read() == b"someone else's"
        assert victim.read_bytes() == b"not yours"
        # Only taken names: a clear error, never a raw FileExistsError.
        with pytest.raises(exc.BackendError, match="taken"):
            shm.create_unmapped(session, 4096, iter([taken] * (shm.NAME_ATTEMPTS + 1)))
    finally:
        shm.remove_session_segments(session)
    assert not procs.segments(session)


# ====================================================================================
# object_store_memory bounds what workers write
# ====================================================================================
def _watch_segment_bytes(session: str):
    """Poll the session's bytes in /dev/shm on a thread; stop() -> the most seen."""
    seen = [0]
    done = threading.Event()

    def run():
        while not done.is_set():
            seen[0] = max(seen[0], procs.segment_bytes(session))
            time.sleep(0.002)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def stop() -> int:
        done.set()
        thread.join(10)
        return seen[0]

    return stop


def test_worker_results_stay_within_object_store_memory(start):
    capacity = 200 * MB
    backend = start(object_store_memory=capacity)
    stop = _watch_segment_bytes(backend.session)
    try:
        n = 60 * MB // 8
        refs = [make_array.remote(n, float(i)) for i in range(6)]  # 360 MB kept alive
        ray.wait(refs, num_returns=len(refs), timeout=120)
        for i, ref in enumerate(refs):
            x = ray.get(ref, timeout=60)
            assert x.shape == (n,) and x[0] == i and x[-1] == i
            del x
    finally:
        most = stop()
    assert 0 < most <= capacity, (most, backend.object_store.stats())
    assert backend.object_store.stats()["spilled_bytes"] > 0
    procs.assert_store_matches_shm(backend)
    del refs


@ray.remote
def array_after_barrier(directory, n, value):
    assert procs.barrier(directory, 2)
    return np.full(n, value, dtype=np.float64)


def test_results_written_at_once_wait_for_room_instead_of_failing(start, tmp_path):
    # Two 60 MB results in a 100 MB store, written at the same moment: the second
    # allocation waits until the first is sealed (then spills it), and neither fails.
    backend = start(object_store_memory=100 * MB)
    n = 60 * MB // 8
    for round_ in range(3):
        directory = tmp_path / f"round{round_}"
        directory.mkdir()
        refs = [array_after_barrier.remote(str(directory), n, float(i)) for i in range(2)]
        ray.wait(refs, num_returns=2, timeout=120)
        for i, ref in enumerate(refs):
            x = ray.get(ref, timeout=60)
            assert x[0] == i and x[-1] == i
            del x
        del refs
        gc.collect()
    procs.assert_store_matches_shm(backend)


@ray.remote
def put_inside(n):
    try:
        ray.put(np.zeros(n, dtype=np.uint8))
    except exc.ObjectStoreFullError as err:
        return str(err)
    return "stored"


def test_result_larger_than_the_store_fails_naming_the_sizes(start):
    backend = start(object_store_memory=30 * MB)
    with pytest.raises(exc.ObjectStoreFullError) as info:
        ray.get(make_array.remote(40 * MB // 8, 1.0), timeout=30)
    numbers = [int(n) for n in re.findall(r"\d+", str(info.value))]
    assert 30 * MB in numbers and any(n >= 40 * MB for n in numbers), str(info.value)
    text = ray.get(put_inside.remote(40 * MB), timeout=30)
    assert str(30 * MB) in text, text
    # The store still works, for workers and for the driver.
    assert float(ray.get(make_array.remote(MB // 8, 3.0), timeout=30)[0]) == 3.0
    assert float(ray.get(ray.put(np.ones(MB)))[0]) == 1.0
    procs.assert_store_matches_shm(backend)


# ====================================================================================
# a worker killed while writing
# ====================================================================================
def _kill_self_once_part_written(record: str) -> None:
    """Arm this worker to SIGKILL itself in the middle of writing its result:
    after the first large buffer was copied into the segment the driver gave it
    (the first return from shm's parallel copy). The segment's name goes to
    `record` first."""
    def hook(frame, event, arg):
        if event == "return" and frame.f_code.co_name == "_parallel_copy":
            with open("/proc/self/maps") as f:
                names = [line.split()[-1] for line in f
                         if "/dev/shm/beamlet-" in line and line.split()[1].startswith("rw")]
            with open(record, "w") as f:
                f.write(os.path.basename(names[0]) if names else "")
            os.kill(os.getpid(), signal.SIGKILL)

    sys.setprofile(hook)


@ray.remote
def two_big_arrays(directory, n):
    arrays = (np.full(n, 1.0), np.full(n, 2.0))
    if procs.touch_new(directory) == 0:  # the first attempt dies while writing
        _kill_self_once_part_written(os.path.join(directory, "killed-segment"))
    return arrays


def test_worker_killed_mid_write_of_large_result_is_retried_and_leaves_nothing(start, tmp_path):
    backend = start()
    n = 128 * MB // 8  # 256 MB in all
    ref = two_big_arrays.options(max_retries=1).remote(str(tmp_path), n)
    a, b = ray.get(ref, timeout=180)
    assert procs.count(str(tmp_path)) == 2  # killed once, then retried
    killed = (tmp_path / "killed-segment").read_text()
    assert killed.startswith(f"beamlet-{backend.session}-"), killed
    assert not os.path.exists(shm.segment_path(killed))
    assert a.shape == b.shape == (n,)
    assert (a == 1.0).all() and (b == 2.0).all()
    procs.assert_store_matches_shm(backend)
    del a, b, ref


@ray.remote(max_retries=-1)
def two_mb(i):
    time.sleep(0.005)
    return np.full(2 * MB // 8, float(i))


def test_repeated_kills_of_tasks_with_2mb_results_lose_nothing(start):
    backend = start()
    scheduler = backend.scheduler
    refs = [two_mb.remote(i) for i in range(200)]
    kills = 0
    until = time.monotonic() + 120
    while kills < 60 and time.monotonic() < until:
        if len(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) == len(refs):
            break
        with scheduler.lock:
            busy = [w.pid for w in scheduler.workers.values() if w.state == "BUSY" and w.pid]
        if busy:
            try:
                os.kill(busy[kills % len(busy)], signal.SIGKILL)
                kills += 1
            except ProcessLookupError:
                pass
        time.sleep(0.02)
    assert kills >= 10
    values = ray.get(refs, timeout=120)
    assert [(v[0], v[-1]) for v in values] == [(float(i), float(i)) for i in range(200)]
    del values, refs
    gc.collect()
    assert procs.wait_until(lambda: backend.object_store.stats()["shm_bytes"] == 0, 10)
    procs.assert_store_matches_shm(backend)


# ====================================================================================
# sessions killed outright, and live ones
# ====================================================================================
_SPILLING_DRIVER = textwrap.dedent("""
    import os, time
    import numpy as np
    import beamlet as ray
    ray.init(backend="local", num_cpus=2, object_store_memory=30_000_000)

    @ray.remote
    def make(n, v):
        return np.full(n, v)

    refs = [ray.put(np.full(1_250_000, float(i))) for i in range(4)]  # 10 MB each: spills
    refs.append(make.remote(1_250_000, 9.0))  # written by a worker
    ray.wait(refs, num_returns=len(refs), timeout=60)
""") + procs.PRINT_FOOTPRINT


def _spill_files(fp: dict) -> list[str]:
    spill = os.path.join(fp["temp_dir"], "spill")
    return sorted(os.listdir(spill)) if os.path.isdir(spill) else []


def _state(fp: dict) -> tuple:
    """What of a session is on disk: its segments, spill files and lock."""
    lock = fp["lock"]
    with open(lock) as f:
        content = f.read()
    return procs.segments(fp["session"]), _spill_files(fp), content


def test_driver_and_zygote_killed_together_are_swept_by_next_init(start, tmp_path):
    driver = procs.Driver(_SPILLING_DRIVER + f"\ntime.sleep({SUBPROCESS_TIMEOUT})\n", tmp_path)
    held = None
    try:
        fp = driver.footprint()
        assert procs.segments(fp["session"]) and _spill_files(fp), procs.leftovers(fp)
        # The session's lock, held here too until we have seen what the session
        # left: the init() of any program beside this test (tests run in parallel)
        # would sweep it as soon as its processes are gone.
        held = procs.hold_file_of(driver.pid, fp["lock"])
        zygote = fp["zygote"]
        assert procs.alive(zygote)
        driver.stop()  # so that it cannot start another zygote in between
        os.kill(zygote[0], signal.SIGKILL)
        driver.kill()
        # The workers leave when the driver's socket closes; nobody cleaned up.
        assert procs.wait_until(lambda: not any(procs.alive(p) for p in fp["procs"]), 10)
        left = procs.leftovers(fp)
        assert any(x.startswith("segment") for x in left) and _spill_files(fp), left
        assert os.path.exists(fp["lock"]) and os.path.isdir(fp["temp_dir"]), left
    finally:
        driver.kill()
        if held is not None:
            os.close(held)
    start()  # init() in another process sweeps the dead session
    # (or an init() beside this test is sweeping it, holding its lock: then that
    # one removes it, within moments)
    assert procs.wait_until(lambda: procs.leftovers(fp) == [], 30), procs.leftovers(fp)


_WAITING_DRIVER = _SPILLING_DRIVER + textwrap.dedent("""
    until = time.monotonic() + 60
    while not os.path.exists("go") and time.monotonic() < until:
        time.sleep(0.02)
    values = ray.get(refs, timeout=60)
    print("VALUES", [float(v[0]) for v in values], flush=True)
    del values
    ray.shutdown()
""")


def test_live_sessions_are_not_swept(start, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "c").mkdir()
    a = procs.Driver(_WAITING_DRIVER, tmp_path / "a")
    try:
        fp_a = a.footprint()
        state_a = _state(fp_a)
        assert state_a[0] and state_a[1]
        # A second live session starts (and sweeps) while A lives.
        backend = start(object_store_memory=30 * MB)
        refs = [ray.put(np.full(10 * MB // 8, float(i))) for i in range(4)]  # spills too
        fp_b = procs.footprint(backend)
        state_b = _state(fp_b)
        assert state_b[0] and state_b[1]
        assert _state(fp_a) == state_a
        # A third one starts and ends while both live.
        c = procs.Driver("import beamlet as ray\nray.init(backend='local', num_cpus=1)\n"
                         "ray.shutdown()\nprint('C DONE', flush=True)\n", tmp_path / "c")
        assert c.finish(SUBPROCESS_TIMEOUT) == 0, c.stderr
        assert "C DONE" in c.stdout
        assert _state(fp_a) == state_a
        assert _state(fp_b) == state_b
        assert [float(ray.get(r)[0]) for r in refs] == [0.0, 1.0, 2.0, 3.0]
        # A still has all its objects.
        (tmp_path / "a" / "go").touch()
        assert a.wait_line("VALUES ") == str([0.0, 1.0, 2.0, 3.0, 9.0])
        assert a.finish(SUBPROCESS_TIMEOUT) == 0, a.stderr
    finally:
        a.kill()
    procs.assert_all_gone(fp_a)
    del refs


def test_sweep_spares_locked_and_listening_sessions_and_takes_dead_ones(tmp_path, monkeypatch):
    # Made by hand here: one dead session of each kind, one live of each kind, in a
    # directory of this test's own in place of /dev/shm: the sweep of any init()
    # beside it (tests run in parallel) would take the dead ones first.
    monkeypatch.setattr(shm, "SHM_DIR", str(tmp_path / "shm"))
    os.mkdir(shm.SHM_DIR, 0o700)
    def segment(session: str) -> str:
        name = shm.create_unmapped(session, 4096)
        return shm.segment_path(name)

    live = sessions.SessionLock()  # locked: alive
    live_seg = segment(live.session)
    dead = secrets.token_hex(8)  # a lock file nobody holds, with its temp dir
    dead_temp = tmp_path / f"beamlet-{dead}-xyz"
    (dead_temp / "spill").mkdir(parents=True)
    (dead_temp / "spill" / "file").write_bytes(b"spilled")
    fd = os.open(sessions.lock_path(dead), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.write(fd, str(dead_temp).encode())
    os.close(fd)
    dead_seg = segment(dead)
    orphan = secrets.token_hex(8)  # segments without a lock file or a socket
    orphan_seg = segment(orphan)
    old = secrets.token_hex(5)  # an older version's live session: no lock file, a socket
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"\0beamlet-{old}")
    listener.listen(1)
    old_seg = segment(old)
    try:
        swept = sessions.sweep()
        assert dead in swept and orphan in swept
        assert live.session not in swept and old not in swept
        assert not os.path.exists(dead_seg) and not os.path.exists(orphan_seg)
        assert not os.path.exists(sessions.lock_path(dead)) and not dead_temp.exists()
        assert os.path.exists(live_seg) and os.path.exists(old_seg)
        assert os.path.exists(live.path) and os.path.isdir(live.temp_dir)
    finally:
        listener.close()
        for session in (live.session, dead, orphan, old):
            shm.remove_session_segments(session)
        os.rmdir(live.temp_dir)
        live.release()
    assert not os.path.exists(live.path)
