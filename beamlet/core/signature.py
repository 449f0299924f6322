"""Checking call arguments against a remote function's or method's signature
in the caller, so that a wrong call raises TypeError at ``.remote()`` (as in
Ray) instead of failing later inside the task."""
from __future__ import annotations

import inspect
from typing import Any, Callable

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


class ArgSpec:
    """The shape of a signature: parameter names, kinds and which have defaults
    (not the defaults or annotations themselves, which may not pickle). It
    travels with actor handles; `check` binds arguments as Python would.

    A plain positional call is checked by counting; anything else by
    ``inspect.Signature.bind`` on a stand-in signature built once."""

    __slots__ = ("params", "_min", "_max", "_signature", "takes_nothing")

    def __init__(self, params: tuple):
        self.params = params  # ((name, kind, has_default), ...)
        kinds = [kind for _, kind, _ in params]
        if inspect.Parameter.VAR_POSITIONAL in kinds:
            self._max = None
        else:
            self._max = sum(1 for kind in kinds if kind in _POSITIONAL)
        self._min = sum(1 for _, kind, has_default in params
                        if kind in _POSITIONAL and not has_default)
        self._signature = None
        #: Whether a call without arguments binds (`check` of none passes).
        self.takes_nothing = self._min == 0

    @classmethod
    def of(cls, function: Callable, skip_first: bool = False) -> "ArgSpec | None":
        """The spec of `function` (dropping its first parameter, `self`, when
        `skip_first`); None when it has no signature Python can read."""
        try:
            signature = inspect.signature(function)
        except (TypeError, ValueError):
            return None
        params = list(signature.parameters.values())
        if skip_first:
            if not params or params[0].kind not in _POSITIONAL:
                # def method(*args): self arrives in args; nothing to drop.
                if params and params[0].kind == inspect.Parameter.VAR_POSITIONAL:
                    return cls(tuple((p.name, int(p.kind), p.default is not p.empty)
                                     for p in params))
                return None
            params = params[1:]
        return cls(tuple((p.name, int(p.kind), p.default is not p.empty) for p in params))

    def check(self, args: tuple, kwargs: dict, what: str) -> None:
        """Raise TypeError, naming `what`, unless ``what(*args, **kwargs)`` binds."""
        if not kwargs and self._min <= len(args) and (self._max is None or len(args) <= self._max):
            return
        signature = self._signature
        if signature is None:
            signature = self._signature = inspect.Signature([
                inspect.Parameter(name, inspect._ParameterKind(kind),
                                  default=None if has_default else inspect.Parameter.empty)
                for name, kind, has_default in self.params])
        try:
            signature.bind(*args, **kwargs)
        except TypeError as err:
            raise TypeError(f"{what}: {err}") from None

    def __reduce__(self):
        return (ArgSpec, (self.params,))

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, ArgSpec) and other.params == self.params

    def __hash__(self) -> int:
        return hash(self.params)
