"""The ``ray`` backend: beamlet programs on Ray, as a thin adapter.

``init(backend="ray")`` starts a local Ray that ``shutdown()`` stops;
``init(backend="ray", address="HOST:PORT")`` connects to a running Ray and
leaves it running. Ray's scheduling, fault tolerance, placement and dashboard
then serve the beamlet program.

How beamlet maps onto Ray (the modules say more):

- ``objects.py``: each beamlet ObjectRef stands for a Ray ObjectRef, which
  every process holding the beamlet ref holds too; values carry the Ray refs
  of the beamlet refs inside them, so Ray's reference counting spans
  processes. ``put`` is ``ray.put``.
- ``scheduler.py``: a task is a Ray task with the request's
  ``num_cpus``/``num_gpus``/``memory``/custom resources, its ref arguments
  resolved by Ray on the worker; an actor is a Ray actor (restarts, ordering
  per caller, ``kill``, ``cancel``, detached lifetime: Ray's own).
- ``worker.py``: what runs on a Ray worker: a beamlet Runtime per job whose
  backend is ``RayBackend`` on the worker's own connection (nested tasks),
  and the Ray actor classes that host beamlet actors.
- ``control.py``: the control store in a detached named Ray actor.

Ray is an optional extra (``pip install 'beamlet[ray]'``); importing beamlet
never imports it.
"""
