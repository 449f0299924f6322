"""Does the ray backend's control actor survive cancels? A stress, not a speed test.

    python benchmarks/ray_control_stress.py --rounds 15 --json out.json

One beamlet session on a local Ray (``backend="ray"``, task events on). Each
round starts tasks that submit nested tasks, and sync named actors whose
calls do too and async ones; cancels half of those tasks and calls at a random moment
(recursive, the default) while they run; ends every actor with a call that
runs ``exit_actor()`` (it sends its task events as it ends), half of those
calls cancelled too; reads the task record (the driver takes the workers'
events). Then it asks the control actor (``beamlet-control``) for its pid: a
new pid means the actor's process died and a new one took its place (every
table of the cluster lost), as Ray 2.60's "Check failed: erased == 1" did
while workers submitted calls on that actor from tasks' threads and from
their main threads outside any task (actors ending: same task ids in two
processes). The run stops at the first such round.

Prints a line per round and a summary; ``--json`` writes the summary (rounds
survived, the failure, the load average). What counts is whether the actor
survives, not the seconds: run it under load (the crash needs it).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

T = 60


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--num-cpus", type=int, default=3)
    parser.add_argument("--actors", type=int, default=3, help="sync and async actors a round")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", default=None, help="write the summary here")
    args = parser.parse_args()
    rng = random.Random(args.seed)

    import beamlet as ray
    from beamlet.util import state
    ray.init(backend="ray", num_cpus=args.num_cpus, task_events=True)
    import ray as real_ray

    from beamlet.backends.ray.control import NAME, NAMESPACE

    @ray.remote
    def leaf(x):
        time.sleep(random.uniform(0, 0.05))
        return x

    @ray.remote
    def parent(n):
        return sum(ray.get([leaf.remote(i) for i in range(n)], timeout=T))

    @ray.remote
    class Sync:
        def work(self, n):
            return sum(ray.get([leaf.remote(i) for i in range(n)], timeout=T))

        def bye(self):
            ray.actor.exit_actor()

    @ray.remote
    class Async:
        async def work(self, n):
            import asyncio
            await asyncio.sleep(rng.uniform(0, 0.1))
            return n

        async def bye(self):
            ray.actor.exit_actor()

    def control_pid() -> int:
        actor = real_ray.get_actor(NAME, namespace=NAMESPACE)
        return real_ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=T)

    first = None
    survived = 0
    failure = None
    start = time.monotonic()
    for r in range(args.rounds):
        try:
            actors = [Sync.options(name=f"s{r}-{i}").remote() for i in range(args.actors)] + \
                     [Async.options(name=f"a{r}-{i}").remote() for i in range(args.actors)]
            tasks = [parent.remote(rng.randint(2, 8)) for _ in range(6)]
            calls = [a.work.remote(rng.randint(2, 6)) for a in actors for _ in range(2)]
            time.sleep(rng.uniform(0.0, 0.6))
            for ref in rng.sample(tasks + calls, k=(len(tasks) + len(calls)) // 2):
                ray.cancel(ref)
            byes = [a.bye.remote() for a in actors]
            time.sleep(rng.uniform(0.0, 0.2))
            for ref in rng.sample(byes, k=len(byes) // 2):
                ray.cancel(ref)  # (as it ends, its actor sends its task events)
            for ref in tasks + calls + byes:
                try:
                    ray.get(ref, timeout=T)
                except Exception:  # noqa: BLE001 - cancelled, or the actor ended: expected
                    pass
            state.list_tasks(limit=10_000)
            pid = control_pid()
            first = pid if first is None else first
            if pid != first:
                failure = f"round {r}: the control actor's pid went {first} -> {pid}"
                print(failure, flush=True)
                break
        except Exception as err:  # noqa: BLE001 - reported as the run's failure
            failure = f"round {r}: {type(err).__name__}: {str(err)[:300]}"
            print(failure, flush=True)
            break
        survived += 1
        print(f"round {r}: the control actor (pid {pid}) lives", flush=True)
    summary = {"rounds": args.rounds, "survived": survived, "failure": failure,
               "seconds": round(time.monotonic() - start, 1),
               "loadavg_at_end": [round(x, 1) for x in os.getloadavg()],
               "python": sys.version.split()[0], "ray": real_ray.__version__}
    ray.shutdown()
    print(f"\n{'rounds':>8} {'survived':>9} {'seconds':>8}  failure")
    print(f"{args.rounds:>8} {survived:>9} {summary['seconds']:>8}  {failure or '-'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0 if failure is None else 1


if __name__ == "__main__":
    sys.exit(main())
