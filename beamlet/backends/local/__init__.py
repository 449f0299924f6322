"""Backends for one machine: ``inprocess`` (serial, in the caller's thread) and
``local`` (worker processes with a shared-memory object store). The node-local
parts of ``local`` (worker pool, shared-memory store, scheduler) are the engine
a cluster node runs."""
