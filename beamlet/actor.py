"""Ray's ``ray.actor`` module under beamlet's name, so that Ray programs that write
``ray.actor.exit_actor()`` or ``from ray.actor import ActorHandle`` run unchanged
after ``import beamlet as ray``. Everything here lives in ``beamlet.core.actor``.
"""
from .core.actor import (ActorClass, ActorHandle, ActorMethod, exit_actor, get_actor,
                         method)

__all__ = ["ActorClass", "ActorHandle", "ActorMethod", "exit_actor", "get_actor", "method"]
