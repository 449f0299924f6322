"""ES's ways of handing episodes to workers, replayed on real episode lengths.

Runs the tuned ES CartPole example in the driver (no workers: the episodes are
the same whatever the number of workers) for some iterations, keeps every
episode's length, then replays each iteration through a model of 1 and of 2
workers on as many cores, for each hand-out rule: ``share`` (one equal share
per worker), ``slices`` (`WorkerSet.balanced`: shrinking slices, two in
flight per worker, each next one to the worker that just answered) and
``claims`` (`WorkerSet.claimed`: one call per worker, each episode taken by the
first worker free). The model's costs: ``--step-us`` of worker CPU per env
step, ``--episode-us`` per episode, ``--call-us`` per call on the worker,
``--latency-us`` one way per message, ``--driver-us`` of driver CPU per call
(half to send it, half to take its result; with 2 workers on 2 cores it is
taken from a worker's core), ``--update-ms`` of serial driver work per
iteration. Prints the speed-up from 1 to 2 workers per rule, with no costs
(the split alone) and with the costs; no wall clock is read, so the load does
not change it.

    python benchmarks/es_split_model.py --iterations 40 --json out.json
"""
from __future__ import annotations

import argparse
import heapq
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from beamlet.contrib.rl.cli import load_tuned_example  # noqa: E402
from beamlet.contrib.rl.env_runner import slice_bounds  # noqa: E402
from beamlet.contrib.rl.es import ES, ESConfig  # noqa: E402

EXAMPLE = os.path.join(os.path.dirname(HERE), "beamlet", "contrib", "rl", "tuned_examples",
                       "es_cartpole.json")


def episode_lengths(iterations: int) -> list[list[int]]:
    """Each iteration's episode lengths, in the order the workers take them."""
    spec = load_tuned_example(EXAMPLE)
    cfg = ESConfig().update_from_dict(spec["config"]).environment("CartPole-v1")
    algo = ES(cfg.env_runners(num_env_runners=0).debugging(seed=0))
    try:
        out = []
        for _ in range(iterations):
            algo.train()
            out.append(algo.last_episode_steps.tolist())
        return out
    finally:
        algo.stop()


def iteration(lengths: list[int], workers: int, rule: str, cost: dict) -> float:
    """Seconds one iteration takes in the model (see the module's docstring)."""
    step, episode, call = cost["step"], cost["episode"], cost["call"]
    latency, driver, update = cost["latency"], cost["driver"], cost["update"]
    steal = [0.0] * workers            # driver CPU taken from each worker's core
    clock = {"driver": update / 2, "turn": 0}

    def driver_work(t: float) -> float:
        clock["driver"] = max(clock["driver"], t) + driver / 2
        if workers > 1:
            steal[clock["turn"] % workers] += driver / 2
            clock["turn"] += 1
        return clock["driver"]

    def run(lo: int, hi: int) -> float:
        return sum(step * n + episode for n in lengths[lo:hi])

    free = [0.0] * workers             # when each worker is done with what it holds
    done = []                          # (when its result reaches the driver, worker)

    def send(w: int, work: float) -> None:
        start = max(free[w], driver_work(clock["driver"]) + latency)
        extra, steal[w] = steal[w], 0.0
        free[w] = start + call + work + extra
        heapq.heappush(done, (free[w] + latency, w))

    total = len(lengths)
    if rule == "claims" or workers == 1:
        starts = []
        for w in range(workers):
            starts.append(driver_work(clock["driver"]) + latency + call)
        ends = list(starts)
        for n in lengths:               # each episode to the first worker free
            w = ends.index(min(ends))
            ends[w] += step * n + episode + cost["claim"]
        for w in range(workers):
            extra, steal[w] = steal[w], 0.0
            heapq.heappush(done, (ends[w] + extra + latency, w))
        slices = []
    elif rule == "share":
        slices = slice_bounds(total, workers, min_size=total)
    else:
        slices = slice_bounds(total, workers, min_size=1)
    slices = list(slices)
    in_flight = 2 if rule == "slices" else 1
    for _ in range(in_flight):
        for w in range(workers):
            if slices:
                send(w, run(*slices.pop(0)))
    end = 0.0
    while done:
        t, w = heapq.heappop(done)
        end = driver_work(t)
        if slices:
            send(w, run(*slices.pop(0)))
    return end + update / 2


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iterations", type=int, default=40)
    p.add_argument("--step-us", type=float, default=25.0)
    p.add_argument("--episode-us", type=float, default=20.0)
    p.add_argument("--call-us", type=float, default=100.0)
    p.add_argument("--claim-us", type=float, default=5.0)
    p.add_argument("--latency-us", type=float, default=60.0)
    p.add_argument("--driver-us", type=float, default=300.0)
    p.add_argument("--update-ms", type=float, default=1.5)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    lengths = episode_lengths(args.iterations)
    cost = {"step": args.step_us * 1e-6, "episode": args.episode_us * 1e-6,
            "call": args.call_us * 1e-6, "claim": args.claim_us * 1e-6,
            "latency": args.latency_us * 1e-6, "driver": args.driver_us * 1e-6,
            "update": args.update_ms * 1e-3}
    free = dict(cost, episode=0.0, call=0.0, claim=0.0, latency=0.0, driver=0.0, update=0.0)
    print(f"{sum(map(len, lengths))} episodes, {sum(map(sum, lengths))} env steps in "
          f"{len(lengths)} iterations; speed-up from 1 to 2 workers:")
    rows = []
    for rule in ("share", "slices", "claims"):
        row = {"rule": rule}
        for name, c in (("split_alone", free), ("with_costs", cost)):
            one = sum(iteration(ls, 1, rule, c) for ls in lengths)
            two = sum(iteration(ls, 2, rule, c) for ls in lengths)
            row[name] = round(one / two, 3)
        rows.append(row)
        print(f"  {rule:7s} split alone x{row['split_alone']:.2f}, with the costs "
              f"x{row['with_costs']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cost": {k: v for k, v in vars(args).items() if k != "json"},
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
