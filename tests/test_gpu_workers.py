"""Workers that ran GPU tasks run only GPU tasks, and the reverse: a GPU task
leaves CUDA state and ``CUDA_VISIBLE_DEVICES`` behind in its process, so a CPU
task must never land there (nor a GPU task in a CPU task's process). Only
where tasks run in processes of their own; no GPU is needed (the resource is
declared)."""
from __future__ import annotations

import os

import pytest

import beamlet as ray

T = 30
ISOLATED_BACKENDS = ["local"]  # (the backends whose tasks run in worker processes)


@ray.remote(num_gpus=1)
def on_gpu():
    return os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES")


@ray.remote(num_cpus=1)
def on_cpu():
    return os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES")


@pytest.mark.parametrize("name", ISOLATED_BACKENDS)
def test_gpu_and_cpu_tasks_never_share_a_worker(start_backend, name):
    start_backend(name, num_cpus=2, num_gpus=1)
    gpu_pids, cpu_pids = set(), set()
    for _ in range(3):
        pid, visible = ray.get(on_gpu.remote(), timeout=T)
        assert visible == "0"
        gpu_pids.add(pid)
        for pid, visible in ray.get([on_cpu.remote() for _ in range(2)], timeout=T):
            assert not visible
            cpu_pids.add(pid)
    # Mixed in one batch too.
    mixed = [(i % 2, on_gpu.remote() if i % 2 else on_cpu.remote()) for i in range(6)]
    for gpu, (pid, _) in zip([g for g, _ in mixed], ray.get([r for _, r in mixed], timeout=T)):
        (gpu_pids if gpu else cpu_pids).add(pid)
    assert gpu_pids and cpu_pids and not gpu_pids & cpu_pids


@pytest.mark.parametrize("name", ISOLATED_BACKENDS)
def test_a_full_worker_pool_makes_room_for_the_other_kind(start_backend, name):
    start_backend(name, num_cpus=1, num_gpus=1, max_workers=1)
    cpu_pid, _ = ray.get(on_cpu.remote(), timeout=T)
    gpu_pid, visible = ray.get(on_gpu.remote(), timeout=T)
    assert visible == "0" and gpu_pid != cpu_pid
    assert ray.get(on_cpu.remote(), timeout=T)[0] not in (gpu_pid, cpu_pid)
