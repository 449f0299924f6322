"""Validation of `@remote(...)` and `.options(...)` arguments, at the call site."""
from __future__ import annotations

import numbers
from typing import Any

_RESOURCE_OPTIONS = {"num_cpus", "num_gpus", "resources", "memory", "accelerator_type"}

# Ray options accepted everywhere and ignored: they only switch Ray's observability on/off.
_IGNORED_OPTIONS = {"enable_task_events"}

TASK_OPTIONS = frozenset(_RESOURCE_OPTIONS | _IGNORED_OPTIONS | {
    "num_returns", "max_retries", "retry_exceptions", "name", "scheduling_strategy",
    "runtime_env", "max_calls", "_generator_backpressure_num_objects"})

ACTOR_OPTIONS = frozenset(_RESOURCE_OPTIONS | _IGNORED_OPTIONS | {
    "name", "namespace", "lifetime", "max_restarts", "max_task_retries", "max_concurrency",
    "get_if_exists", "scheduling_strategy", "runtime_env", "max_pending_calls",
    "concurrency_groups"})

METHOD_OPTIONS = frozenset(_IGNORED_OPTIONS | {"num_returns", "max_task_retries", "name",
                                                "concurrency_group",
                                                "_generator_backpressure_num_objects"})

#: The `num_returns` of a generator call (see core/generators.py): refs as the
#: items are made, or one ref to all of them once the task ends (Ray's older form).
STREAMING = "streaming"
DYNAMIC = "dynamic"

# Resource names that have their own option: using them in resources={} is an error.
_RESERVED = {"CPU": "num_cpus", "GPU": "num_gpus", "memory": "memory"}


def validate(options: dict, allowed: frozenset, what: str) -> dict:
    """Check option names and values; return a normalised copy."""
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"invalid option(s) {', '.join(map(repr, unknown))} for {what}; "
                         f"valid options are: {', '.join(sorted(allowed))}")
    out = dict(options)
    for key in ("num_cpus", "num_gpus", "memory"):
        if key in out and out[key] is not None:
            _check_amount(key, out[key])
    if out.get("resources") is not None:
        res = out["resources"]
        if not isinstance(res, dict):
            raise TypeError(f"resources must be a dict of name -> amount, got {res!r}")
        for name, amount in res.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"resource names must be non-empty strings, got {name!r}")
            if name in _RESERVED:
                raise ValueError(f"use the {_RESERVED[name]}= option instead of "
                                 f"resources={{{name!r}: ...}}")
            _check_amount(f"resources[{name!r}]", amount)
    if "num_returns" in out:
        n = out["num_returns"]
        if n not in (STREAMING, DYNAMIC) and (
                not isinstance(n, int) or isinstance(n, bool) or n < 0):
            raise ValueError(f"num_returns must be an integer >= 0, {STREAMING!r} or "
                             f"{DYNAMIC!r}, got {n!r}")
    if "_generator_backpressure_num_objects" in out:
        v = out["_generator_backpressure_num_objects"]
        if not isinstance(v, int) or isinstance(v, bool) or v == 0 or v < -1:
            raise ValueError(f"_generator_backpressure_num_objects must be an integer >= 1 "
                             f"(or -1: no backpressure), got {v!r}")
    for key in ("max_retries", "max_restarts", "max_task_retries"):
        if key in out:
            v = out[key]
            if not isinstance(v, int) or isinstance(v, bool) or v < -1:
                raise ValueError(f"{key} must be an integer >= -1 (-1: unlimited), got {v!r}")
    if "max_concurrency" in out:
        v = out["max_concurrency"]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"max_concurrency must be an integer >= 1, got {v!r}")
    if out.get("concurrency_groups") is not None:
        out["concurrency_groups"] = check_concurrency_groups(out["concurrency_groups"])
    if out.get("concurrency_group") is not None and not isinstance(out["concurrency_group"], str):
        raise TypeError(f"concurrency_group must be a string naming one of the actor's "
                        f"concurrency_groups, got {out['concurrency_group']!r}")
    if "retry_exceptions" in out:
        v = out["retry_exceptions"]
        if not (isinstance(v, bool) or (isinstance(v, (list, tuple)) and
                                        all(isinstance(t, type) and issubclass(t, BaseException)
                                            for t in v))):
            raise TypeError("retry_exceptions must be a bool or a list of exception classes, "
                            f"got {v!r}")
    for key in ("name", "namespace"):
        if out.get(key) is not None and not isinstance(out[key], str):
            raise TypeError(f"{key} must be a string, got {out[key]!r}")
    if out.get("runtime_env") is not None:
        out["runtime_env"] = check_runtime_env(out["runtime_env"])
    if out.get("scheduling_strategy") is not None:
        from .placement import check_strategy
        out["scheduling_strategy"] = check_strategy(out["scheduling_strategy"])
    return out


def check_concurrency_groups(groups: Any) -> dict:
    """A valid ``concurrency_groups``: a dict of group name (a non-empty str) to
    its max concurrency (an integer >= 1), as in Ray."""
    if not isinstance(groups, dict):
        raise TypeError(f"concurrency_groups must be a dict of group name -> max concurrency, "
                        f"got {groups!r}")
    for name, limit in groups.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"concurrency group names must be non-empty strings, got {name!r}")
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ValueError(f"the max concurrency of concurrency group {name!r} must be an "
                             f"integer >= 1, got {limit!r}")
    return dict(groups)


#: The runtime_env fields honoured; any other is refused rather than ignored.
RUNTIME_ENV_FIELDS = frozenset({"env_vars"})


def check_runtime_env(runtime_env: Any) -> dict:
    """A valid ``runtime_env``: a dict (or Ray's RuntimeEnv, a dict too) whose
    ``env_vars`` map str to str. Fields beamlet does not honour (``working_dir``,
    ``pip``, ``conda``...) raise ValueError naming them: a program that needs
    them must not run without them."""
    if not isinstance(runtime_env, dict):
        raise TypeError(f"runtime_env must be a dict, got {runtime_env!r}")
    unsupported = sorted(k for k, v in runtime_env.items()
                         if k not in RUNTIME_ENV_FIELDS and v not in (None, {}, [], ""))
    if unsupported:
        raise ValueError(f"runtime_env field(s) {', '.join(map(repr, unsupported))} are not "
                         f"supported: beamlet honours only {', '.join(sorted(RUNTIME_ENV_FIELDS))} "
                         f"(install packages and ship code yourself)")
    env_vars = runtime_env.get("env_vars") or {}
    if not isinstance(env_vars, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env_vars.items()):
        raise TypeError(f"runtime_env['env_vars'] must be a dict of str to str, got {env_vars!r}")
    return {"env_vars": dict(env_vars)} if env_vars else {}


def env_vars_of(options: dict) -> dict | None:
    """The environment variables a (validated) options dict asks for, or None."""
    runtime_env = options.get("runtime_env")
    return (runtime_env or {}).get("env_vars") or None


def _check_amount(what: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a number, got {value!r}")
    if value < 0:
        raise ValueError(f"{what} must be >= 0, got {value!r}")


def resource_request(options: dict, default_cpus: float) -> dict[str, float]:
    """The resource dict a scheduler sees, e.g. {"CPU": 1.0, "GPU": 0.5, "custom": 2.0}."""
    req: dict[str, float] = {}
    cpus = options.get("num_cpus")
    cpus = default_cpus if cpus is None else cpus
    if cpus:
        req["CPU"] = float(cpus)
    gpus = options.get("num_gpus")
    if gpus:
        req["GPU"] = float(gpus)
    if options.get("memory"):
        req["memory"] = float(options["memory"])
    for name, amount in (options.get("resources") or {}).items():
        if amount:
            req[name] = float(amount)
    return req


# Keys every backend's config carries (set by init()).
INIT_KEYS = frozenset({"backend", "address", "num_cpus", "num_gpus", "resources", "namespace",
                       "control_store", "runtime_env", "job_metadata", "default_actor_lifetime"})

# Ray's init() options that have no meaning here: accepted and ignored, so Ray
# programs run unchanged.
RAY_INIT_OPTIONS_IGNORED = frozenset({
    "include_dashboard", "dashboard_host", "dashboard_port", "log_to_driver", "logging_level",
    "logging_format", "logging_config", "configure_logging",
    "_temp_dir", "_system_config", "_metrics_export_port", "_node_ip_address",
    "_enable_object_reconstruction", "_plasma_directory", "_memory", "storage",
    "log_to_stderr"})


def check_backend_options(config: dict, accepted: frozenset, backend: str) -> None:
    """Raise ValueError naming any ``init()`` keyword the backend does not know."""
    unknown = sorted(set(config) - INIT_KEYS - RAY_INIT_OPTIONS_IGNORED - accepted)
    if unknown:
        raise ValueError(f"init() got option(s) {', '.join(map(repr, unknown))} that the "
                         f"{backend!r} backend does not take; its own options are: "
                         f"{', '.join(sorted(accepted)) or 'none'}")
