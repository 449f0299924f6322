"""Every registered RL algorithm as a Tune trainable, under its own name:
``tune.run("PPO", config={"env": "CartPole-v1", "lr": tune.grid_search([...])})``.
The trial's config is the algorithm's flat config dict."""
from __future__ import annotations

from beamlet.contrib.tune.trainable import Trainable

__all__ = ["AlgorithmTrainable", "algorithm_trainables"]

# Keys of an algorithm's result that Tune computes itself.
_TUNE_KEYS = ("training_iteration", "time_this_iter_s")


class AlgorithmTrainable(Trainable):
    """Runs ``algorithm_name`` (a class attribute) one ``train()`` per step."""

    algorithm_name = "PPO"

    def setup(self, config: dict) -> None:
        from .registry import get_algorithm_class
        cls = get_algorithm_class(self.algorithm_name)
        self.algo = cls(cls.config_class().update_from_dict(config))

    def step(self) -> dict:
        result = self.algo.train()
        learner = result.pop("learner", {})
        for key in _TUNE_KEYS:
            result.pop(key, None)
        result.update({f"learner/{k}": v for k, v in learner.items()})
        return result

    def cleanup(self) -> None:
        self.algo.stop()


def algorithm_trainables() -> dict:
    """``{name: Trainable subclass}`` for every installed RL algorithm."""
    from .registry import algorithm_classes
    out = {}
    for name in algorithm_classes():
        out[name] = type(f"{name}Trainable", (AlgorithmTrainable,),
                         {"algorithm_name": name, "__module__": __name__})
    return out
