"""The ``beamlet`` command line and ``python -m beamlet.demo``."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from beamlet import cli

SUBPROCESS_TIMEOUT = 90  # below pytest-timeout's 120 s, so a hang fails with output
DEMO_EXAMPLES = ["dynamic task graph", "nested parallelism", "simulator actor",
                 "parameter server"]


def _run(args: list[str], **env_changes):
    env = dict(os.environ)
    env.pop("BEAMLET_BACKEND", None)
    env.update(env_changes)
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT)


def _explain(proc) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


def test_backends_lists_builtin_backends(capsys, monkeypatch):
    monkeypatch.delenv("BEAMLET_BACKEND", raising=False)
    assert cli.main(["backends"]) == 0
    out = capsys.readouterr().out
    names = [line.split()[0] for line in out.splitlines()[1:] if line.strip()]
    assert "inprocess" in names and "local*" in names, out  # local is the default


def test_backends_command_as_a_program():
    proc = _run(["-m", "beamlet.cli", "backends"])
    assert proc.returncode == 0, _explain(proc)
    assert "inprocess" in proc.stdout and "local" in proc.stdout


def test_backend_flags_are_read_without_starting_the_backend():
    from beamlet.core.interfaces import Backend

    class Fast(Backend):
        parallel = True
        zero_copy = True

        def __init__(self, config, runtime):  # pragma: no cover - must not run
            raise AssertionError("backend_flags started the backend")

        def shutdown(self):  # pragma: no cover
            pass

    def factory(config, runtime):  # pragma: no cover - must not run
        raise AssertionError("backend_flags called the factory")

    assert cli.backend_flags(Fast) == {"parallel": True, "isolated": False,
                                       "zero_copy": True, "multi_node": False,
                                       "manages_workers": True, "task_events": False,
                                       "placement_groups": False, "concurrency_groups": False,
                                       "streaming_generators": False,
                                       "owner_fate_sharing": False, "actors_lend_cpus": True,
                                       "prompt_state": True}
    factory.backend_class = "beamlet.backends.local.inprocess:InProcessBackend"
    assert cli.backend_flags(factory) == {"parallel": False, "isolated": False,
                                          "zero_copy": False, "multi_node": False,
                                          "manages_workers": True, "task_events": True,
                                          "placement_groups": True, "concurrency_groups": True,
                                          "streaming_generators": True,
                                          "owner_fate_sharing": False, "actors_lend_cpus": True,
                                       "prompt_state": True}
    factory.backend_class = "no.such.module:Backend"
    assert cli.backend_flags(factory) is None
    del factory.backend_class
    assert cli.backend_flags(factory) is None


def test_readme_table_of_backends_is_the_generated_one(capsys):
    """The README's table of backends and their flags is `beamlet backends
    --markdown`, not written by hand: regenerate it when a flag changes."""
    assert cli.main(["backends", "--markdown"]) == 0
    table = capsys.readouterr().out.strip()
    assert table.startswith("| backend |") and "| `dask` |" in table, table
    readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "README.md")
    with open(readme) as f:
        text = f.read()
    assert table in text, f"README.md's table of backends is stale; it should be:\n{table}"


def test_importing_beamlet_does_not_import_dask_or_ray():
    code = ("import sys, beamlet, beamlet.cli; beamlet.cli.main(['backends']); "
            "print(sorted(m for m in ('dask', 'distributed', 'ray') if m in sys.modules))")
    proc = _run(["-c", code])
    assert proc.returncode == 0, _explain(proc)
    assert proc.stdout.strip().splitlines()[-1] == "[]", _explain(proc)


def test_importing_beamlet_loads_its_names_on_first_use():
    """``import beamlet`` loads the API's modules when a name is first used
    (a process that runs tasks only, such as a Dask worker, needs few of them);
    every public name, ``from beamlet import *`` and ``dir`` work as before."""
    code = ("import sys, beamlet; before = 'beamlet.core.api' in sys.modules; "
            "init = beamlet.init; from beamlet import *; "
            "from beamlet.core import api, actor, object_ref; "
            "missing = [n for n in beamlet.__all__ if n not in globals()]; "
            "assert init is api.init and remote is api.remote, 'init'; "
            "assert beamlet.ActorHandle is actor.ActorHandle, 'ActorHandle'; "
            "assert beamlet.ObjectID is beamlet.ObjectRef is object_ref.ObjectRef, 'ObjectID'; "
            "assert util.ActorPool and exceptions.GetTimeoutError and job_config.JobConfig; "
            "assert set(beamlet.__all__) <= set(dir(beamlet)), 'dir'; "
            "print('RESULT', before, missing)")
    proc = _run(["-c", code])
    assert proc.returncode == 0, _explain(proc)
    assert proc.stdout.strip().splitlines()[-1] == "RESULT False []", _explain(proc)
    proc = _run(["-c", "import beamlet; beamlet.no_such_name"])
    assert proc.returncode != 0 and \
        "AttributeError: module 'beamlet' has no attribute 'no_such_name'" in proc.stderr, \
        _explain(proc)


def test_version(capsys):
    import beamlet
    assert cli.main(["version"]) == 0
    assert capsys.readouterr().out.strip() == f"beamlet {beamlet.__version__}"


def test_cluster_commands_are_listed_with_their_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["start", "--help"])
    out = capsys.readouterr().out
    for option in ("--head", "--address", "--token", "--port", "--host", "--redis-address",
                   "--num-cpus", "--num-gpus", "--resources"):
        assert option in out, option


def test_start_needs_a_role(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["start"])
    assert info.value.code == 2
    assert "--head" in capsys.readouterr().err


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    out = capsys.readouterr().out
    for name in ("demo", "backends", "version", "start"):
        assert name in out


def test_unknown_arguments_are_rejected():
    with pytest.raises(SystemExit) as info:
        cli.main(["version", "--bogus"])
    assert info.value.code == 2


def _check_demo_output(proc) -> None:
    assert proc.returncode == 0, _explain(proc)
    out = proc.stdout
    assert "backend 'inprocess'" in out, out
    assert "first task result" in out, out
    for name in DEMO_EXAMPLES:
        assert f"- {name}: " in out, out
    assert "FAILED" not in out, out
    assert "all examples ok" in out, out


def test_demo_module_runs_every_example():
    proc = _run(["-m", "beamlet.demo", "--backend", "inprocess"])
    _check_demo_output(proc)
    try:
        import gymnasium  # noqa: F401
    except ImportError:
        assert "simulator actor: skipped" in proc.stdout
    else:
        assert "CartPole" in proc.stdout


def test_demo_subcommand_honours_beamlet_backend():
    proc = _run(["-m", "beamlet.cli", "demo"], BEAMLET_BACKEND="inprocess")
    _check_demo_output(proc)


def test_demo_reports_an_unknown_backend():
    proc = _run(["-m", "beamlet.demo", "--backend", "nope"])
    assert proc.returncode == 1, _explain(proc)
    assert "unknown backend 'nope'" in proc.stderr, _explain(proc)
