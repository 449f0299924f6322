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
        # id(request) -> (request, ((name, units), ...), shape): a request's amounts
        # in units, worked out once per request dict (specs of one function share it).
        self._units_of: dict[int, tuple] = {}
        #: id(request) -> request found feasible (check_feasible returns at once for
        #: those; callers on a hot path may look here first). Cleared, never replaced.
        self.feasible: dict[int, dict] = {}
        # What is free of each GPU device (a fraction of one can be shared), so a
        # task sees its devices in CUDA_VISIBLE_DEVICES and no whole-GPU task gets
        # a device that fractional tasks use.
        self._gpu_free = [_UNIT] * int(num_gpus or 0)
        # Placement groups (see reserve_group): key -> (what its bundles take
        # from the node, {its own resource name: units}, reserved yet?).
        self._groups: dict[str, list] = {}
        self._group_names: dict[str, int] = {}  # every group's resource names -> capacity
        # The GPU devices reserved groups hold: key -> per bundle, [{device:
        # units it reserved}, {device: units free of those}] (only groups with GPUs).
        self._group_gpus: dict[str, list] = {}
        self._bundles: dict[str, list] = {}  # key -> its bundles, as asked
        #: Bundles added to a reserved group, not reserved yet (`add_group`):
        #: key -> [what they take, their resource names, their bundles].
        self._more: dict[str, list] = {}

    def total(self) -> dict[str, float]:
        return {k: v / _UNIT for k, v in self._total.items()}

    def available(self) -> dict[str, float]:
        return {k: v / _UNIT for k, v in self._free.items()}

    def check_feasible(self, request: dict[str, float], what: str) -> None:
        """Raise ValueError if `request` could never fit, naming the resource."""
        if self.feasible.get(id(request)) is request:
            return
        for name, amount in request.items():
            have = self._total.get(name)
            if have is None:
                have = self._group_names.get(name)  # (a group still pending)
            if have is None and "_group_" in name:
                raise ValueError(f"{what} is scheduled in a placement group that was removed "
                                 f"(or never existed here): it could never run")
            if have is None:
                raise ValueError(f"{what} requests resource {name!r} ({amount}), which no "
                                 f"node has; known resources: {', '.join(sorted(self._total))}")
            if _units(amount) > have:
                raise ValueError(f"{what} requests {amount} {name}, but the cluster only has "
                                 f"{have / _UNIT}: it could never run")
        if len(self.feasible) >= 4096:
            self.feasible.clear()
        self.feasible[id(request)] = request

    def _remember(self, request: dict[str, float]) -> tuple:
        """(request, its amounts in units, its shape), worked out once per request."""
        cached = (request, tuple((name, _units(amount)) for name, amount in request.items()),
                  tuple(sorted(request.items())))
        if len(self._units_of) >= 4096:
            self._units_of.clear()
        self._units_of[id(request)] = cached  # (holding it: its id stays its own)
        return cached

    def shape(self, request: dict[str, float]) -> tuple:
        """The request as a sorted tuple of its items: equal for equal requests
        (a scheduler's queue key), worked out once per request dict."""
        cached = self._units_of.get(id(request))
        if cached is None or cached[0] is not request:
            cached = self._remember(request)
        return cached[2]

    def fits(self, request: dict[str, float]) -> bool:
        free = self._free
        cached = self._units_of.get(id(request))  # (inline, not a method: a hot path)
        units_of = cached[1] if cached is not None and cached[0] is request \
            else self._remember(request)[1]
        if len(units_of) == 1 and not self._group_gpus:  # (e.g. {"CPU": 1.0})
            ((name, units),) = units_of
            if name != "GPU":
                return free.get(name, 0) >= units
        for name, units in units_of:
            if free.get(name, 0) < units:
                return False
        gpus = request.get("GPU", 0)
        if not gpus and self._group_gpus:
            wanted = _group_gpu_request(request)
            return wanted is None or self._group_devices(*wanted, take=False) is not None
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

    def try_acquire(self, request: dict[str, float]) -> list[int] | None:
        """`fits` then `acquire` in one step: the GPU ids assigned, or None
        (nothing taken) if the request does not fit now."""
        free = self._free
        cached = self._units_of.get(id(request))
        units_of = cached[1] if cached is not None and cached[0] is request \
            else self._remember(request)[1]
        if len(units_of) == 1 and not self._group_gpus:  # (e.g. {"CPU": 1.0})
            ((name, units),) = units_of
            if name == "GPU":
                return self.acquire(request) if self.fits(request) else None
            if free.get(name, 0) < units:
                return None
            free[name] -= units
            return []
        for name, units in units_of:
            if free.get(name, 0) < units:
                return None
        if "GPU" in request or self._group_gpus:
            return self.acquire(request) if self.fits(request) else None
        for name, units in units_of:
            free[name] -= units
        return []

    def acquire(self, request: dict[str, float]) -> list[int]:
        """Take the request (it must fit); return the GPU ids assigned, if any."""
        free = self._free
        cached = self._units_of.get(id(request))
        units_of = cached[1] if cached is not None and cached[0] is request \
            else self._remember(request)[1]
        for name, units in units_of:
            free[name] -= units
        gpus = request.get("GPU", 0)
        if not gpus and self._group_gpus:
            wanted = _group_gpu_request(request)
            return [] if wanted is None else self._group_devices(*wanted, take=True) or []
        if not gpus or not self._gpu_free:
            return []
        devices = self._gpu_devices(gpus) or []
        share = _UNIT if gpus >= 1 else _units(gpus)
        for i in devices:
            self._gpu_free[i] -= share
        return devices

    def release(self, request: dict[str, float], gpu_ids: list[int] = ()) -> None:
        free = self._free
        cached = self._units_of.get(id(request))
        units_of = cached[1] if cached is not None and cached[0] is request \
            else self._remember(request)[1]
        for name, units in units_of:
            if name in free:  # (not: a placement group removed while it ran)
                free[name] += units
        if not gpu_ids:
            return
        gpus = request.get("GPU", 0)
        if not gpus:
            wanted = _group_gpu_request(request)
            if wanted is not None:
                self._group_give_back(*wanted, gpu_ids)
            return
        share = _UNIT if gpus >= 1 else _units(gpus)
        for i in gpu_ids:
            self._gpu_free[i] += share

    def release_cpus(self, request: dict[str, float]) -> None:
        """Give back only the CPUs of a request (a task blocked in get), the
        node's or a placement group's."""
        for name in cpu_names(request):
            if name in self._free:
                self._free[name] += _units(request[name])

    def reacquire_cpus(self, request: dict[str, float]) -> None:
        """Take the CPUs back after a blocked get, even if that oversubscribes for a while."""
        for name in cpu_names(request):
            if name in self._free:
                self._free[name] -= _units(request[name])


    # -- placement groups ---------------------------------------------------------
    def add_group(self, key: str, bundles: list[dict[str, float]],
                  hosted: list[int] | None = None) -> None:
        """Know placement group `key` (its resources are feasible from now on),
        not reserved yet: ValueError if its bundles together could never fit
        this node (every bundle lands on this one machine). `hosted`: the
        indices of the bundles this node holds (a cluster places the others
        on other nodes); None: all. Adding bundles of a group this node holds
        some of already (a cluster placing again those lost with another
        node) reserves them on their own, then merges them into the group."""
        if hosted is not None:
            bundles = [b if i in hosted else {} for i, b in enumerate(bundles)]
        need: dict[str, float] = {}
        for bundle in bundles:
            for name, amount in bundle.items():
                need[name] = need.get(name, 0) + amount
        self.check_feasible(need, f"placement group {key} (all its bundles on one node)")
        names: dict[str, int] = {}
        for i, bundle in enumerate(bundles):
            if hosted is not None and i not in hosted:
                continue
            for name, amount in bundle.items():
                names[group_resource(name, key, i)] = _units(amount)
                wide = group_resource(name, key)
                names[wide] = names.get(wide, 0) + _units(amount)
            names[group_resource("bundle", key, i)] = _units(BUNDLE_CAPACITY)
        names[group_resource("bundle", key)] = _units(BUNDLE_CAPACITY) * (
            len(bundles) if hosted is None else len(hosted))
        part = [{n: _units(a) for n, a in need.items()}, names, bundles]
        _add_units(self._group_names, names)
        entry = self._groups.get(key)
        if entry is None:
            self._groups[key] = [part[0], names, False]
            self._bundles[key] = [dict(b) for b in bundles]
        elif not entry[2]:  # (none reserved yet: all are, together)
            self._merge_part(key, part)
        else:
            more = self._more.get(key)
            if more is None:
                self._more[key] = part
            else:
                _add_units(more[0], part[0])
                _add_units(more[1], names)
                more[2] = [b or more[2][i] for i, b in enumerate(bundles)]

    def _merge_part(self, key: str, part: list) -> None:
        """Count bundles added to group `key` (`add_group`) as its own."""
        entry = self._groups[key]
        _add_units(entry[0], part[0])
        _add_units(entry[1], part[1])
        self._bundles[key] = [b or self._bundles[key][i] for i, b in enumerate(part[2])]

    def reserve_group(self, key: str) -> bool:
        """Reserve the bundles of group `key` from what is free, all or none:
        whether it is reserved now. Tasks in the group then take from its own
        resources (``CPU_group_<i>_<key>``...), not from the node's."""
        entry = self._groups.get(key)
        if entry is None:
            return False
        need, names, reserved = entry
        if reserved:
            more = self._more.get(key)
            if more is None:
                return True
            need, names, bundles = more
        else:
            bundles = self._bundles[key]
        free = self._free
        if any(free.get(name, 0) < units for name, units in need.items()):
            return False
        devices = self._reserve_group_gpus(bundles)
        if devices is None:
            return False
        if devices:
            held = self._group_gpus.get(key)
            if held is None:
                self._group_gpus[key] = devices
            else:  # (added bundles: theirs by index, the others' as they were)
                self._group_gpus[key] = [new if new[0] else old
                                         for new, old in zip(devices, held)]
        for name, units in need.items():
            free[name] -= units
        for name, units in names.items():
            self._total[name] = self._total.get(name, 0) + units if reserved else units
            free[name] = free.get(name, 0) + units if reserved else units
        if reserved:
            self._merge_part(key, self._more.pop(key))
        entry[2] = True
        return True

    def remove_group(self, key: str) -> None:
        """Forget group `key`, giving back what it reserved. Requests naming its
        resources are infeasible from now on."""
        entry = self._groups.pop(key, None)
        if entry is None:
            return
        need, names, reserved = entry
        self._bundles.pop(key, None)
        more = self._more.pop(key, None)
        if more is not None:
            for name in more[1]:
                self._group_names.pop(name, None)
        for bundle in self._group_gpus.pop(key, ()):
            for device, units in bundle[0].items():
                self._gpu_free[device] += units
        for name in names:
            self._group_names.pop(name, None)
            if reserved:
                self._total.pop(name, None)
                self._free.pop(name, None)
        if reserved:
            for name, units in need.items():
                self._free[name] += units
        self.feasible.clear()  # (requests found feasible may name its resources)

    def _reserve_group_gpus(self, bundles: list[dict]) -> list | None:
        """Take GPU devices for each bundle that asks for GPUs, all or none
        (None: they do not fit now); [] when no bundle asks or the node has
        no devices to tell apart."""
        if not self._gpu_free or not any(b.get("GPU") for b in bundles):
            return []
        taken: list = []
        for bundle in bundles:
            gpus = bundle.get("GPU", 0)
            devices = self._gpu_devices(gpus) if gpus else []
            if devices is None:
                for held, _ in taken:  # (undo: all or none)
                    for device, units in held.items():
                        self._gpu_free[device] += units
                return None
            share = _UNIT if gpus >= 1 else _units(gpus)
            held = {}
            for device in devices:
                self._gpu_free[device] -= share
                held[device] = share
            taken.append((held, dict(held)))
        return [list(pair) for pair in taken]

    def _group_devices(self, key: str, index: int | None, gpus: float,
                       take: bool) -> list[int] | None:
        """The devices of group `key` (its bundle `index`, or any) a task
        asking for `gpus` gets, as `_gpu_devices` does for the node; taken
        if `take`. [] if the group holds no devices (nothing to tell apart)."""
        bundles = self._group_gpus.get(key)
        if not bundles:
            return []
        share = _UNIT if gpus >= 1 else _units(gpus)
        chosen = None
        for i, (_, free) in enumerate(bundles):
            if index is not None and i != index:
                continue
            if gpus >= 1:
                whole = [d for d, f in free.items() if f == _UNIT]
                if len(whole) >= int(gpus):
                    chosen = (free, whole[:int(gpus)])
                    break
            else:
                fitting = [d for d, f in free.items() if f >= share]
                if fitting:
                    chosen = (free, [min(fitting, key=lambda d: (free[d], d))])
                    break
        if chosen is None:
            return None
        if take:
            for device in chosen[1]:
                chosen[0][device] -= share
        return chosen[1]

    def _group_give_back(self, key: str, index: int | None, gpus: float,
                         gpu_ids: list[int]) -> None:
        share = _UNIT if gpus >= 1 else _units(gpus)
        for device in gpu_ids:
            for i, (held, free) in enumerate(self._group_gpus.get(key, ())):
                if (index is None or i == index) and device in held \
                        and free[device] + share <= held[device]:
                    free[device] += share
                    break

    def pending_groups(self) -> list[str]:
        """The keys of the groups not reserved yet, oldest first."""
        return [key for key, entry in self._groups.items()
                if not entry[2] or key in self._more]


#: What each bundle has of the ``bundle`` resource every task in it takes a
#: sliver of (as in Ray), so tasks asking for nothing are still tied to it.
BUNDLE_CAPACITY = 1000.0
BUNDLE_SHARE = 0.001


def _add_units(into: dict, more: dict) -> None:
    for name, units in more.items():
        into[name] = into.get(name, 0) + units


def group_resource(name: str, key: str, index: int | None = None) -> str:
    """The resource of placement group `key` standing for `name` in its bundle
    `index` (None: in any of its bundles), named as in Ray."""
    return f"{name}_group_{key}" if index is None else f"{name}_group_{index}_{key}"


def asks_gpu(request: dict[str, float]) -> bool:
    """Whether a request wants GPUs, the node's or a placement group's."""
    return bool(request.get("GPU")) or _group_gpu_request(request) is not None


def _group_gpu_request(request: dict[str, float]) -> tuple | None:
    """``(group key, bundle index or None, GPUs)`` of a request renamed into a
    placement group (core/placement.py) that asks for GPUs; else None."""
    found = None
    for name, amount in request.items():
        if name.startswith("GPU_group_") and amount:
            rest = name[len("GPU_group_"):]
            index, _, key = rest.partition("_")
            if key:
                return key, int(index), amount  # (the bundle's own name: the narrowest)
            found = (rest, None, amount)
    return found


def cpu_names(request: dict[str, float]) -> list[str]:
    """The names of a request's CPUs (the node's, or a placement group's): what
    a task blocked in get lends out."""
    if "CPU" in request:
        return ["CPU"]
    return [name for name in request if name.startswith("CPU_group_")]


def _physical_memory() -> int:
    """Bytes of RAM: the default total of the ``memory`` resource, as in Ray."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0
