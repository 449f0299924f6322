"""The ``beamlet`` command line.

    beamlet demo [--backend NAME]   run the seed's examples (= python -m beamlet.demo)
    beamlet backends                list the installed backends and their capabilities
    beamlet version                 print beamlet's version
    beamlet start|stop|status       the cluster's nodes (added by backends/zmq/plugin.py)

Plugins add sub-commands with the ``beamlet_cli_commands(subparsers)`` hook:
each command sets ``func=callable(args) -> int`` with ``set_defaults``.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

from .core import plugins

CAPABILITY_FLAGS = ("parallel", "isolated", "zero_copy", "multi_node", "manages_workers",
                    "task_events", "placement_groups", "concurrency_groups",
                    "streaming_generators", "owner_fate_sharing", "actors_lend_cpus",
                    "prompt_state")

# Exit code when no command was given (the help is printed).
NOT_AVAILABLE = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with `argv` (default: ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "takes_any_arguments", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return NOT_AVAILABLE
    code = func(args)
    return 0 if code is None else int(code)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="beamlet",
        description="beamlet: Python functions as tasks and classes as actors, "
                    "with Ray's programming model and pluggable backends.")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    demo = sub.add_parser("demo", help="run the seed's examples and time them",
                          description="Run the seed's examples (same as python -m beamlet.demo).")
    demo.add_argument("--backend", default=None,
                      help="backend to run on (default: $BEAMLET_BACKEND, then 'local')")
    demo.set_defaults(func=_cmd_demo)

    backends = sub.add_parser("backends", help="list the installed backends",
                              description="List the installed backends (none is started).")
    backends.add_argument("--markdown", action="store_true",
                          help="print the table of flags as Markdown (the README's table)")
    backends.set_defaults(func=_cmd_backends)

    timeline = sub.add_parser(
        "timeline", help="run a program and write its tasks' timeline (Chrome trace)",
        description="Run PROGRAM (a Python script, with its arguments) and, when its driver "
                    "shuts down, write the timeline of its task attempts to FILE, in the "
                    "Chrome trace format that chrome://tracing and Perfetto load.")
    timeline.add_argument("file", metavar="FILE", help="where to write the trace (JSON)")
    timeline.add_argument("program", metavar="PROGRAM", help="the Python script to run")
    timeline.add_argument("program_args", metavar="ARGS", nargs=argparse.REMAINDER,
                          help="the script's own arguments")
    timeline.set_defaults(func=_cmd_timeline)

    version = sub.add_parser("version", help="print beamlet's version")
    version.set_defaults(func=_cmd_version)

    plugins.manager().hook.beamlet_cli_commands(subparsers=sub)
    return parser


# -- commands ---------------------------------------------------------------------

def _cmd_demo(args) -> int:
    from . import demo
    argv = [] if args.backend is None else ["--backend", args.backend]
    return demo.main(argv)


def _cmd_timeline(args) -> int:
    import subprocess

    from .core.api import TIMELINE_ENV_VAR
    if not os.path.isfile(args.program):
        print(f"beamlet timeline: no such program: {args.program}", file=sys.stderr)
        return NOT_AVAILABLE
    path = os.path.abspath(args.file)
    if os.path.exists(path):
        os.unlink(path)  # (so that a program that never starts beamlet is noticed)
    env = dict(os.environ, **{TIMELINE_ENV_VAR: path})
    code = subprocess.call([sys.executable, args.program, *args.program_args], env=env)
    if not os.path.exists(path):
        print(f"beamlet timeline: {args.program} ran no beamlet job on a backend that "
              f"records tasks; nothing written", file=sys.stderr)
        return code or NOT_AVAILABLE
    print(f"beamlet timeline: wrote {path}", file=sys.stderr)
    return code


def _cmd_version(args) -> int:
    from . import __version__
    print(f"beamlet {__version__}")
    return 0


def _cmd_backends(args) -> int:
    from .core.api import BACKEND_ENV_VAR, DEFAULT_BACKEND
    factories = plugins.backend_factories()
    if args.markdown:
        print(backends_markdown(factories))
        return 0
    providers = _providers()
    default = os.environ.get(BACKEND_ENV_VAR) or DEFAULT_BACKEND
    rows = [("NAME", *(f.upper() for f in CAPABILITY_FLAGS), "PROVIDED BY")]
    for name in sorted(factories):
        flags = backend_flags(factories[name])
        cells = ["?" if flags is None else ("yes" if flags[f] else "no") for f in CAPABILITY_FLAGS]
        label = f"{name}*" if name == default else name
        rows.append((label, *cells, providers.get(name, "?")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print(f"\n* = the default of init(): ${BACKEND_ENV_VAR} if set, else {DEFAULT_BACKEND!r}")
    if any(backend_flags(f) is None for f in factories.values()):
        print("? = not declared: a plugin declares its flags by returning the Backend class "
              "as the factory, or by setting factory.backend_class")
    if default not in factories:
        print(f"\nnote: the default backend {default!r} is not installed", file=sys.stderr)
    return 0


# -- helpers ----------------------------------------------------------------------

def backends_markdown(factories: dict) -> str:
    """The Markdown table of the backends' capability flags (the README shows
    this table, generated, never written by hand)."""
    lines = ["| backend | " + " | ".join(f"`{f}`" for f in CAPABILITY_FLAGS) + " |",
             "| --- |" + " --- |" * len(CAPABILITY_FLAGS)]
    for name in sorted(factories):
        flags = backend_flags(factories[name])
        cells = ["?" if flags is None else ("yes" if flags[f] else "no")
                 for f in CAPABILITY_FLAGS]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _providers() -> dict[str, str]:
    """backend name -> the name of the plugin that provides it."""
    out = {}
    for impl in plugins.manager().hook.beamlet_backends.get_hookimpls():
        try:
            names = impl.function() or {}
        except Exception:  # noqa: BLE001 - a broken plugin must not break the listing
            continue
        for name in names:
            out[name] = impl.plugin_name
    return out


def backend_flags(factory) -> dict[str, bool] | None:
    """The capability flags of the backend a factory builds, without starting it.

    Known when the factory is a ``Backend`` subclass itself, or names one in a
    ``backend_class`` attribute (the class, or ``"module:QualName"``, imported
    here but not instantiated). None otherwise."""
    from .core.interfaces import Backend
    cls = getattr(factory, "backend_class", None)
    if cls is None and isinstance(factory, type):
        cls = factory
    if isinstance(cls, str):
        module_name, _, qualname = cls.partition(":")
        try:
            obj = importlib.import_module(module_name)
            for part in qualname.split("."):
                obj = getattr(obj, part)
        except Exception:  # noqa: BLE001 - unknown is an answer here
            return None
        cls = obj
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        return None
    return {flag: bool(getattr(cls, flag, False)) for flag in CAPABILITY_FLAGS}


if __name__ == "__main__":
    sys.exit(main())
