"""Ray's ``ray.util.multiprocessing``: a drop-in ``multiprocessing.Pool`` whose
processes are actors (``from beamlet.util.multiprocessing import Pool``)."""
from .pool import AsyncResult, Pool, TimeoutError

__all__ = ["Pool", "AsyncResult", "TimeoutError"]
