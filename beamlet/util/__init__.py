"""Utilities on top of the public API."""
from .actor_pool import ActorPool

__all__ = ["ActorPool"]
