"""``beamlet rl train|evaluate|plot`` (added to ``beamlet`` through the
``beamlet_cli_commands`` hook).

    beamlet rl train --algo PPO --env CartPole-v1 --stop '{"episode_return_mean": 475}'
                     [--num-env-runners 2] [--config JSON] [--checkpoint-dir DIR]
    beamlet rl train -f beamlet/contrib/rl/tuned_examples/ppo_cartpole.json
    beamlet rl evaluate --checkpoint DIR --episodes 10 [--render rgb_array --video out.gif]
    beamlet rl plot DIR [--metric episode_return_mean] [--output curve.png]

``train`` prints one line per iteration, writes Tune's ``result.json``,
``progress.csv``, ``params.json`` and TensorBoard event files in
the checkpoint directory, and saves ``checkpoint_NNNNNN`` there every
``--checkpoint-freq`` iterations and at the end.
"""
from __future__ import annotations

import csv
import json
import math
import os
import sys
import time

__all__ = ["add_commands", "train_main", "load_tuned_example"]


def add_commands(subparsers) -> None:
    rl = subparsers.add_parser("rl", help="reinforcement learning (beamlet.rl)",
                               description="Train, evaluate and plot beamlet.rl algorithms.")
    sub = rl.add_subparsers(title="rl commands", metavar="COMMAND")
    rl.set_defaults(func=lambda args: (rl.print_help(), 2)[1])

    train = sub.add_parser("train", help="train an algorithm until a stop criterion")
    train.add_argument("-f", "--file", default=None,
                       help="a tuned example (JSON with algo, env, stop, config)")
    train.add_argument("--algo", "--run", dest="algo", default=None, help="e.g. PPO, DQN")
    train.add_argument("--env", default=None, help="a Gymnasium id or a registered name")
    train.add_argument("--stop", default=None,
                       help='JSON, e.g. \'{"episode_return_mean": 475}\' (any reached stops)')
    train.add_argument("--config", default=None, help="JSON dict of algorithm settings")
    train.add_argument("--num-env-runners", type=int, default=None)
    train.add_argument("--seed", type=int, default=None)
    train.add_argument("--checkpoint-dir", default=None,
                       help="where results and checkpoints go (default: "
                            "~/beamlet_results/ALGO_ENV_TIME)")
    train.add_argument("--checkpoint-freq", type=int, default=10,
                       help="save every N iterations (0: only at the end)")
    train.add_argument("--backend", default=None, help="beamlet backend (default: local)")
    train.set_defaults(func=_cmd_train)

    ev = sub.add_parser("evaluate", help="run episodes with a checkpoint's policy")
    ev.add_argument("--checkpoint", required=True, help="a checkpoint or a train directory")
    ev.add_argument("--episodes", type=int, default=10)
    ev.add_argument("--render", default=None, choices=["rgb_array"],
                    help="render each step (needs --video)")
    ev.add_argument("--video", default=None, help="write the rendered frames as a GIF")
    ev.add_argument("--backend", default=None)
    ev.set_defaults(func=_cmd_evaluate)

    plot = sub.add_parser("plot", help="draw a training run's learning curve as a PNG")
    plot.add_argument("dir", help="a train directory (holding progress.csv)")
    plot.add_argument("--metric", default="episode_return_mean")
    plot.add_argument("--x", default="num_env_steps_sampled_lifetime")
    plot.add_argument("--output", default=None, help="default: DIR/learning_curve.png")
    plot.set_defaults(func=_cmd_plot)


def _json_arg(text: str | None, what: str) -> dict:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise SystemExit(f"beamlet rl: {what} is not valid JSON ({err}): {text!r}")
    if not isinstance(value, dict):
        raise SystemExit(f"beamlet rl: {what} must be a JSON object, got {text!r}")
    return value


def load_tuned_example(path: str) -> dict:
    """A tuned example file: a JSON object with ``algo``, ``env``, ``stop`` and
    ``config``."""
    with open(path) as f:
        try:
            spec = json.load(f)
        except json.JSONDecodeError as err:
            raise SystemExit(f"beamlet rl: {path} is not valid JSON: {err}")
    unknown = set(spec) - {"algo", "env", "stop", "config", "description"}
    if unknown:
        raise SystemExit(f"beamlet rl: {path}: unknown keys {sorted(unknown)} (use algo, env, "
                         f"stop, config)")
    return spec


def _start(backend: str | None) -> bool:
    """Start beamlet unless it runs; True if this call started it."""
    import beamlet
    if beamlet.is_initialized():
        return False
    beamlet.init(backend=backend)
    return True


def _stop(started: bool) -> None:
    if started:
        import beamlet
        beamlet.shutdown()


class _Run:
    """What Tune's logger callbacks need of a trial: ``path`` and ``config``."""

    def __init__(self, path: str, config: dict):
        self.path = path
        self.config = config


def _stop_reached(result: dict, stop: dict) -> bool:
    for key, bound in stop.items():
        value = result.get(key)
        if isinstance(value, (int, float)) and not math.isnan(value) and value >= bound:
            return True
    return False


def train_main(algo_name: str, env: str, stop: dict, config: dict, checkpoint_dir: str,
               checkpoint_freq: int = 10, out=None) -> str:
    """Train until any `stop` criterion is met, printing a line per iteration to
    `out` (default: the current ``sys.stdout``); return the last checkpoint's path."""
    out = sys.stdout if out is None else out
    from beamlet.contrib.tune.loggers import (CSVLoggerCallback, JsonLoggerCallback,
                                              TBXLoggerCallback)

    from .registry import get_algorithm_class
    if not stop:
        raise SystemExit("beamlet rl train: give --stop (e.g. '{\"training_iteration\": 10}')")
    cls = get_algorithm_class(algo_name)
    cfg = cls.config_class().update_from_dict(config)
    if env is not None:
        cfg.environment(env)
    algo = cls(cfg)
    os.makedirs(checkpoint_dir, exist_ok=True)
    run = _Run(checkpoint_dir, {"algo": algo_name, "env": cfg.env, **config})
    loggers = [JsonLoggerCallback(), CSVLoggerCallback(), TBXLoggerCallback()]
    for lg in loggers:
        lg.log_trial_start(run)
    start, last = time.time(), None
    try:
        while True:
            result = algo.train()
            result["time_total_s"] = time.time() - start
            for lg in loggers:
                lg.log_trial_result(result["training_iteration"], run, result)
            print(f"iter {result['training_iteration']:4d}  "
                  f"steps {result['num_env_steps_sampled_lifetime']:8d}  "
                  f"return {result['episode_return_mean']:9.2f}  "
                  f"len {result['episode_len_mean']:7.1f}  "
                  f"time {result['time_total_s']:7.1f}s", file=out, flush=True)
            done = _stop_reached(result, stop)
            it = result["training_iteration"]
            if done or (checkpoint_freq and it % checkpoint_freq == 0):
                last = algo.save(os.path.join(checkpoint_dir, f"checkpoint_{it:06d}"))
            if done:
                break
    finally:
        for lg in loggers:
            lg.log_trial_end(run)
        algo.stop()
    print(f"checkpoint: {last}", file=out, flush=True)
    return last


def _cmd_train(args) -> int:
    spec = load_tuned_example(args.file) if args.file else {}
    algo = args.algo or spec.get("algo")
    env = args.env or spec.get("env")
    if not algo:
        raise SystemExit("beamlet rl train: give --algo (e.g. PPO) or -f FILE")
    stop = dict(spec.get("stop") or {})
    stop.update(_json_arg(args.stop, "--stop"))
    config = dict(spec.get("config") or {})
    config.update(_json_arg(args.config, "--config"))
    if args.num_env_runners is not None:
        config["num_env_runners"] = args.num_env_runners
    if args.seed is not None:
        config["seed"] = args.seed
    env = env or config.pop("env", None)
    if not env:
        raise SystemExit("beamlet rl train: give --env (e.g. CartPole-v1)")
    directory = args.checkpoint_dir or os.path.join(
        os.path.expanduser("~/beamlet_results"),
        f"{algo}_{env}_{time.strftime('%Y-%m-%d_%H-%M-%S')}")
    started = _start(args.backend)
    try:
        train_main(algo, env, stop, config, directory, args.checkpoint_freq)
    finally:
        _stop(started)
    return 0


def _cmd_evaluate(args) -> int:
    from .algorithm import Algorithm
    if args.video and not args.render:
        args.render = "rgb_array"
    if args.render and not args.video:
        raise SystemExit("beamlet rl evaluate: --render needs --video FILE.gif")
    started = _start(args.backend)
    frames: list | None = [] if args.render else None
    try:
        algo = Algorithm.from_checkpoint(args.checkpoint)
        try:
            result = algo.evaluate(args.episodes, render_mode=args.render,
                                   frames=frames)["evaluation"]
        finally:
            algo.stop()
    finally:
        _stop(started)
    for i, r in enumerate(result["episode_returns"]):
        print(f"episode {i + 1}: return {r:.2f}")
    print(f"mean return {result['episode_return_mean']:.2f} over {result['num_episodes']} "
          f"episodes (mean length {result['episode_len_mean']:.1f})")
    if args.video:
        from .images import write_gif
        write_gif(args.video, frames)
        print(f"video: {args.video} ({len(frames)} frames)")
    return 0


def _cmd_plot(args) -> int:
    from .images import plot_curve
    path = os.path.join(args.dir, "progress.csv")
    if not os.path.isfile(path):
        raise SystemExit(f"beamlet rl plot: no progress.csv in {args.dir!r}")
    xs, ys = [], []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if args.metric not in row or args.x not in row:
                raise SystemExit(f"beamlet rl plot: {path} has no column {args.metric!r} or "
                                 f"{args.x!r}")
            try:
                xs.append(float(row[args.x]))
                ys.append(float(row[args.metric]))
            except ValueError:
                continue
    output = args.output or os.path.join(args.dir, "learning_curve.png")
    plot_curve(output, xs, ys, title=os.path.basename(os.path.abspath(args.dir)),
               xlabel=args.x, ylabel=args.metric)
    print(f"plot: {output}")
    return 0

