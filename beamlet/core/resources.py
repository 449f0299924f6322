"""Resource accounting shared by schedulers: totals, what is free, what fits."""
from __future__ import annotations

import os

# Amounts are kept in units of 1/10000 so that fractions (0.1 CPU) add up exactly.
_UNIT = 10_000


def _units(amount: float) -> int:
    return round(amount * _UNIT)


class ResourcePool:
    """The resources of one node: ``CPU``, ``GPU``, ``memory`` and custom names.

    Not thread-safe: the owning scheduler serialises access.
    """

    def __init__(self, num_cpus: float | None = None, num_gpus: float | None = None,
                 resources: dict | None = None):
        cpus = (os.cpu_count() or 1) if num_cpus is None else num_cpus
        totals = {"CPU": cpus, "GPU": num_gpus or 0}
        totals.update(resources or {})
        self._total = {k: _units(v) for k, v in totals.items()}
        self._free = dict(self._total)
        # GPU ids handed out, so tasks can see them in CUDA_VISIBLE_DEVICES.
        self._free_gpu_ids = list(range(int(num_gpus or 0)))

    def total(self) -> dict[str, float]:
        return {k: v / _UNIT for k, v in self._total.items()}

    def available(self) -> dict[str, float]:
        return {k: v / _UNIT for k, v in self._free.items()}

    def check_feasible(self, request: dict[str, float], what: str) -> None:
        """Raise ValueError if `request` could never fit, naming the resource."""
        for name, amount in request.items():
            have = self._total.get(name)
            if have is None:
                raise ValueError(f"{what} requests resource {name!r} ({amount}), which no "
                                 f"node has; known resources: {', '.join(sorted(self._total))}")
            if _units(amount) > have:
                raise ValueError(f"{what} requests {amount} {name}, but the cluster only has "
                                 f"{have / _UNIT}: it could never run")

    def fits(self, request: dict[str, float]) -> bool:
        free = self._free
        return all(free.get(name, 0) >= _units(amount) for name, amount in request.items())

    def acquire(self, request: dict[str, float]) -> list[int]:
        """Take the request (it must fit); return the GPU ids assigned, if any."""
        for name, amount in request.items():
            self._free[name] -= _units(amount)
        gpus = request.get("GPU", 0)
        if not gpus or not self._free_gpu_ids:
            return []
        if gpus < 1:  # a fraction shares a device: show it without taking it
            return self._free_gpu_ids[:1]
        n = int(gpus)
        assigned, self._free_gpu_ids = self._free_gpu_ids[:n], self._free_gpu_ids[n:]
        return assigned

    def release(self, request: dict[str, float], gpu_ids: list[int] = ()) -> None:
        for name, amount in request.items():
            self._free[name] += _units(amount)
        if gpu_ids and request.get("GPU", 0) >= 1:
            self._free_gpu_ids.extend(gpu_ids)
            self._free_gpu_ids.sort()

    def release_cpus(self, request: dict[str, float]) -> None:
        """Give back only the CPUs of a request (a task blocked in get)."""
        if "CPU" in request:
            self._free["CPU"] += _units(request["CPU"])

    def reacquire_cpus(self, request: dict[str, float]) -> None:
        """Take the CPUs back after a blocked get, even if that oversubscribes for a while."""
        if "CPU" in request:
            self._free["CPU"] -= _units(request["CPU"])
