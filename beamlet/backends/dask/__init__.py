"""The ``dask`` backend: beamlet programs on a Dask ``distributed`` cluster.

``init(backend="dask", address="tcp://host:8786")`` joins a running Dask
scheduler, ``init(backend="dask", client=my_client)`` uses a Client the user
made, and a plain ``init(backend="dask")`` starts a ``LocalCluster`` (one
single-threaded worker process per CPU) that ``shutdown()`` stops.

How beamlet maps onto Dask (the modules say more):

- ``objects.py``: an ObjectRef is a Dask key, ``beamlet-<id hex>``; the value
  held under it is a beamlet ``SerializedObject``. Each process keeps a Future
  per key it references, so Dask's own distributed reference counting frees
  an object once no beamlet process holds a ref to it.
- ``scheduler.py``: a task is ``Client.submit`` of ``worker.run_task`` under its
  return key, its ref arguments passed as Futures (Dask resolves them where
  the task runs), its CPU/GPU/custom request as Dask worker resources. A
  by-value argument larger than the inline threshold is scattered to a worker
  at the call (the task gets its ref, and Dask runs the task there), rather
  than copied into the task and sent through the scheduler.
- ``worker.py``: what runs on a Dask worker: a beamlet Runtime per job whose
  backend is ``DaskBackend`` on the worker's own client (nested tasks; a
  blocking ``get`` secedes from the worker's thread pool, so nested waits
  cannot deadlock), and ``ActorHost``, the Dask actor that hosts one beamlet
  actor and runs its calls in order per caller.
- ``control.py``: the control store on the Dask scheduler's metadata, with a
  Dask ``Lock`` for compare-and-set.

Dask is an optional extra (``pip install 'beamlet[dask]'``); importing beamlet
never imports it.
"""
