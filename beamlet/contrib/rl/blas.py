"""Keep numpy's BLAS single-threaded where beamlet.rl computes.

The networks of classic control are tiny: a multi-threaded OpenBLAS spends more
time waking and spinning its threads than multiplying (a 256x64 by 64x64
product took 3.5 ms with its threads on a loaded 2-core machine, 0.2 ms
without), and env runners already parallelise over processes. This is what
threadpoolctl does, for OpenBLAS only, through the library's own setter;
other BLAS builds are left alone.
"""
from __future__ import annotations

import ctypes
import re

__all__ = ["set_blas_threads"]

_SETTERS = ("openblas_set_num_threads", "openblas_set_num_threads64_",
            "scipy_openblas_set_num_threads", "scipy_openblas_set_num_threads64_")
_done: dict[int, bool] = {}


def _loaded_openblas() -> list[str]:
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return []
    return sorted(set(re.findall(r"(/\S*openblas\S*\.so[^\s]*)", maps)))


def set_blas_threads(n: int = 1) -> bool:
    """Set OpenBLAS's thread count in this process (once per count); True if it could."""
    if n in _done:
        return _done[n]
    import numpy  # noqa: F401 - loads the BLAS library
    ok = False
    for path in _loaded_openblas():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in _SETTERS:
            setter = getattr(lib, name, None)
            if setter is not None:
                setter(int(n))
                ok = True
                break
    _done.clear()
    _done[n] = ok
    return ok
