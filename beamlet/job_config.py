"""Ray's ``ray.job_config.JobConfig``: settings for the whole job, passed as
``init(job_config=...)``.

Honoured: ``runtime_env`` (as ``init(runtime_env=)``, which wins over it;
only ``env_vars``, like everywhere in beamlet), ``ray_namespace`` (as
``init(namespace=)``), ``default_actor_lifetime`` ("non_detached" or
"detached": the lifetime of actors created without ``lifetime=``) and
``metadata`` (a dict of str to str, kept as the job's and readable with
``get_runtime_context().get_job_metadata()``). The Java fields
(``jvm_options``, ``code_search_path``) and ``_py_driver_sys_path`` are
refused with ValueError: beamlet runs Python, and ships no code paths.
"""
from __future__ import annotations

from typing import Any

from .core.options import check_runtime_env

__all__ = ["JobConfig"]

_LIFETIMES = ("non_detached", "detached")


class JobConfig:
    def __init__(self, jvm_options: list | None = None, code_search_path: list | None = None,
                 runtime_env: dict | None = None, _client_job: bool = False,
                 metadata: dict | None = None, ray_namespace: str | None = None,
                 default_actor_lifetime: str = "non_detached",
                 _py_driver_sys_path: list | None = None):
        for name, value in (("jvm_options", jvm_options), ("code_search_path", code_search_path),
                            ("_py_driver_sys_path", _py_driver_sys_path)):
            if value:
                raise ValueError(f"JobConfig({name}=...) is not supported: beamlet runs Python "
                                 f"code only and ships no code paths")
        self.runtime_env: dict = {}
        self.metadata: dict = {}
        self.ray_namespace: str | None = None
        self.default_actor_lifetime = "non_detached"
        if runtime_env is not None:
            self.set_runtime_env(runtime_env)
        self.set_metadata_dict(metadata or {})
        if ray_namespace is not None:
            self.set_ray_namespace(ray_namespace)
        self.set_default_actor_lifetime(default_actor_lifetime)

    def set_runtime_env(self, runtime_env: dict | None, validate: bool = False) -> None:
        self.runtime_env = check_runtime_env(runtime_env) if runtime_env is not None else {}

    def set_metadata(self, key: str, value: str) -> None:
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"job metadata maps str to str, got {key!r}: {value!r}")
        self.metadata[key] = value

    def set_metadata_dict(self, metadata: dict) -> None:
        if not isinstance(metadata, dict):
            raise TypeError(f"metadata must be a dict of str to str, got {metadata!r}")
        for key, value in metadata.items():
            self.set_metadata(key, value)

    def set_ray_namespace(self, ray_namespace: str) -> None:
        if not isinstance(ray_namespace, str) or not ray_namespace:
            raise TypeError(f"ray_namespace must be a non-empty string, got {ray_namespace!r}")
        self.ray_namespace = ray_namespace

    def set_default_actor_lifetime(self, default_actor_lifetime: str) -> None:
        if default_actor_lifetime not in _LIFETIMES:
            raise ValueError(f"default_actor_lifetime must be one of {', '.join(_LIFETIMES)}, "
                             f"got {default_actor_lifetime!r}")
        self.default_actor_lifetime = default_actor_lifetime

    def _init_options(self) -> dict[str, Any]:
        """What `init` takes from this config."""
        return {"runtime_env": self.runtime_env, "namespace": self.ray_namespace,
                "metadata": dict(self.metadata),
                "default_actor_lifetime": self.default_actor_lifetime}

    def __repr__(self) -> str:
        return (f"JobConfig(runtime_env={self.runtime_env!r}, metadata={self.metadata!r}, "
                f"ray_namespace={self.ray_namespace!r}, "
                f"default_actor_lifetime={self.default_actor_lifetime!r})")
