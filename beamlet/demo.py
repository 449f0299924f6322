"""Run the seed's examples and show what happened and how long it took.

    python -m beamlet.demo [--backend NAME]      (or: beamlet demo)

The examples are the ones of the article beamlet grew from (see the README):
a dynamic task graph, nested parallelism, a simulator actor (gymnasium's
CartPole, when gymnasium is installed) and a parameter server. They run on the
default backend (``$BEAMLET_BACKEND``, then ``local``) unless ``--backend``
names another one.
"""
from __future__ import annotations

import argparse
import functools
import sys
import time
from typing import Callable, Sequence

import numpy as np

import beamlet as ray


# -- 1. a dynamic task graph: zeros, zeros -> multiply ------------------------------

@ray.remote
def multiply(x, y):
    return np.dot(x, y)


@ray.remote
def zeros(size):
    return np.zeros(size)


def dynamic_graph() -> str:
    x_id = zeros.remote((100, 100))
    y_id = zeros.remote((100, 100))
    z_id = multiply.remote(x_id, y_id)  # scheduled once both inputs exist
    z = ray.get(z_id)
    assert z.shape == (100, 100) and not z.any()
    return f"zeros + zeros -> multiply: 3 tasks, result shape {z.shape}"


# -- 2. nested parallelism: experiments that run simulations ------------------------

@ray.remote
def simulation(seed):
    rng = np.random.default_rng(seed)
    a, b = rng.random((200, 200)), rng.random((200, 200))
    return float(np.dot(a, b).sum())


@ray.remote
def experiment(index, num_simulations=8):
    # A task that creates more tasks: the graph grows while it runs.
    refs = [simulation.remote(index * 100 + s) for s in range(num_simulations)]
    return sum(ray.get(refs))


def nested() -> str:
    results = ray.get([experiment.remote(i) for i in range(2)])
    expected = [sum(ray.get([simulation.remote(i * 100 + s) for s in range(8)]))
                for i in range(2)]
    assert np.allclose(results, expected), (results, expected)
    return (f"2 experiments x 8 simulations, each experiment a task submitting tasks; "
            f"sums {results[0]:.0f} and {results[1]:.0f}")


# -- 3. an actor wrapping a simulator ------------------------------------------------

def _gymnasium():
    try:
        import gymnasium
    except ImportError:
        return None
    return gymnasium


@ray.remote
class Simulator(object):
    def __init__(self, env_name="CartPole-v1"):
        import gymnasium as gym
        self.env = gym.make(env_name)
        self.env.reset(seed=0)

    def step(self, action):
        return self.env.step(action)


def simulator() -> str:
    sim = Simulator.remote()
    observations = []
    for _ in range(4):
        observations.append(sim.step.remote(0))  # non-blocking: futures at once
    steps = ray.get(observations)
    assert len(steps) == 4 and all(len(s) == 5 for s in steps)
    rewards = [round(float(s[1]), 2) for s in steps]
    return f"CartPole-v1 in an actor: 4 steps in order, rewards {rewards}"


# -- 4. a parameter server updated by concurrent workers -----------------------------

KEYS = ["key1", "key2", "key3"]
ROUNDS = 50


@ray.remote
class ParameterServer(object):
    def __init__(self, keys, values):
        values = [value.copy() for value in values]
        self.parameters = dict(zip(keys, values))

    def get(self, keys):
        return [self.parameters[key] for key in keys]

    def update(self, keys, values):
        for key, value in zip(keys, values):
            self.parameters[key] += value


@ray.remote
def worker_task(parameter_server, rounds):
    for _ in range(rounds):
        values = ray.get(parameter_server.get.remote(KEYS))
        updates = [np.ones_like(v) for v in values]
        parameter_server.update.remote(KEYS, updates)
    # Calls from one caller run in order, so this read sees all our updates.
    return ray.get(parameter_server.get.remote(KEYS))[0].sum()


def parameter_server() -> str:
    server = ParameterServer.remote(KEYS, [np.zeros(10) for _ in KEYS])
    ray.get([worker_task.remote(server, ROUNDS) for _ in range(4)])
    final = ray.get(server.get.remote(KEYS))
    assert all(np.all(v == 4 * ROUNDS) for v in final), final
    return (f"4 worker tasks x {ROUNDS} rounds of get + update on one actor; "
            f"every parameter is {final[0][0]:.0f} (= 4 x {ROUNDS})")


@ray.remote
def _ping():
    return "pong"


EXAMPLES: list[tuple[str, Callable[[], str]]] = [
    ("dynamic task graph", dynamic_graph),
    ("nested parallelism", nested),
    ("simulator actor", simulator),
    ("parameter server", parameter_server),
]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m beamlet.demo",
                                     description="Run the seed's examples and time them.")
    parser.add_argument("--backend", default=None,
                        help="backend to run on (default: $BEAMLET_BACKEND, then 'local')")
    args = parser.parse_args(argv)
    say = functools.partial(print, flush=True)  # progress shows at once, also in a pipe

    start = time.perf_counter()
    try:
        info = ray.init(backend=args.backend)
    except Exception as err:  # noqa: BLE001 - say what failed and how to go on
        print(f"beamlet.init(backend={args.backend!r}) failed: {type(err).__name__}: {err}",
              file=sys.stderr)
        print("hint: `beamlet backends` lists the installed backends; "
              "--backend inprocess needs nothing but beamlet", file=sys.stderr)
        return 1
    failed = 0
    try:
        init_time = time.perf_counter() - start
        ray.get(_ping.remote())
        first_result = time.perf_counter() - start
        resources = ", ".join(f"{v:g} {k}" for k, v in sorted(info["resources"].items()) if v)
        say(f"beamlet {ray.__version__} on backend {info['backend']!r} ({resources})")
        say(f"  init() took {init_time:.3f} s; first task result {first_result:.3f} s "
            f"after init() was called")
        for name, example in EXAMPLES:
            if example is simulator and _gymnasium() is None:
                say(f"- {name}: skipped (gymnasium is not installed: "
                    f"python3 -m pip install gymnasium)")
                continue
            t0 = time.perf_counter()
            try:
                what = example()
            except Exception as err:  # noqa: BLE001 - report, go on with the next one
                failed += 1
                say(f"- {name}: FAILED after {time.perf_counter() - t0:.3f} s: "
                    f"{type(err).__name__}: {err}")
                continue
            say(f"- {name}: {what} ({time.perf_counter() - t0:.3f} s)")
    finally:
        ray.shutdown()
    total = time.perf_counter() - start
    if failed:
        say(f"{failed} example(s) failed ({total:.2f} s in all)")
        return 1
    say(f"all examples ok ({total:.2f} s in all, shutdown included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
