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
        totals = {"CPU": cpus, "GPU": num_gpus or 0, "memory": _physical_memory()}
        totals.update(resources or {})
        self._total = {k: _units(v) for k, v in totals.items()}
        self._free = dict(self._total)
        # id(request) -> (request, ((name, units), ...)): a request's amounts in
        # units, worked out once per request dict (specs of one function share it).
        self._units_of: dict[int, tuple] = {}
        self._feasible: dict[int, dict] = {}  # id(request) -> request found feasible
        # What is free of each GPU device (a fraction of one can be shared), so a
        # task sees its devices in CUDA_VISIBLE_DEVICES and no whole-GPU task gets
        # a device that fractional tasks use.
        self._gpu_free = [_UNIT] * int(num_gpus or 0)

    def total(self) -> dict[str, float]:
        return {k: v / _UNIT for k, v in self._total.items()}

    def available(self) -> dict[str, float]:
        return {k: v / _UNIT for k, v in self._free.items()}

    def check_feasible(self, request: dict[str, float], what: str) -> None:
        """Raise ValueError if `request` could never fit, naming the resource."""
        if self._feasible.get(id(request)) is request:
            return
        for name, amount in request.items():
            have = self._total.get(name)
            if have is None:
                raise ValueError(f"{what} requests resource {name!r} ({amount}), which no "
                                 f"node has; known resources: {', '.join(sorted(self._total))}")
            if _units(amount) > have:
                raise ValueError(f"{what} requests {amount} {name}, but the cluster only has "
                                 f"{have / _UNIT}: it could never run")
        if len(self._feasible) >= 4096:
            self._feasible.clear()
        self._feasible[id(request)] = request

    def _request_units(self, request: dict[str, float]) -> tuple:
        cached = self._units_of.get(id(request))
        if cached is not None and cached[0] is request:
            return cached[1]
        units = tuple((name, _units(amount)) for name, amount in request.items())
        if len(self._units_of) >= 4096:
            self._units_of.clear()
        self._units_of[id(request)] = (request, units)  # (holding it: its id stays its own)
        return units

    def fits(self, request: dict[str, float]) -> bool:
        free = self._free
        for name, units in self._request_units(request):
            if free.get(name, 0) < units:
                return False
        gpus = request.get("GPU", 0)
        return not gpus or not self._gpu_free or self._gpu_devices(gpus) is not None

    def _gpu_devices(self, gpus: float) -> list[int] | None:
        """The devices a GPU request would get now, or None if none fit."""
        if gpus >= 1:
            whole = [i for i, f in enumerate(self._gpu_free) if f == _UNIT]
            n = int(gpus)
            return whole[:n] if len(whole) >= n else None
        need = _units(gpus)
        # Pack fractions onto the busiest device they fit on, keeping whole ones free.
        fitting = [i for i, f in enumerate(self._gpu_free) if f >= need]
        return [min(fitting, key=lambda i: (self._gpu_free[i], i))] if fitting else None

    def acquire(self, request: dict[str, float]) -> list[int]:
        """Take the request (it must fit); return the GPU ids assigned, if any."""
        free = self._free
        for name, units in self._request_units(request):
            free[name] -= units
        gpus = request.get("GPU", 0)
        if not gpus or not self._gpu_free:
            return []
        devices = self._gpu_devices(gpus) or []
        share = _UNIT if gpus >= 1 else _units(gpus)
        for i in devices:
            self._gpu_free[i] -= share
        return devices

    def release(self, request: dict[str, float], gpu_ids: list[int] = ()) -> None:
        free = self._free
        for name, units in self._request_units(request):
            free[name] += units
        if not gpu_ids:
            return
        gpus = request.get("GPU", 0)
        share = _UNIT if gpus >= 1 else _units(gpus)
        for i in gpu_ids:
            self._gpu_free[i] += share

    def release_cpus(self, request: dict[str, float]) -> None:
        """Give back only the CPUs of a request (a task blocked in get)."""
        if "CPU" in request:
            self._free["CPU"] += _units(request["CPU"])

    def reacquire_cpus(self, request: dict[str, float]) -> None:
        """Take the CPUs back after a blocked get, even if that oversubscribes for a while."""
        if "CPU" in request:
            self._free["CPU"] -= _units(request["CPU"])


def _physical_memory() -> int:
    """Bytes of RAM: the default total of the ``memory`` resource, as in Ray."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0
