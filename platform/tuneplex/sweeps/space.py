"""A sweep's search space, checked field by field: ``{name: {"type": "float" | "int" |
"categorical", "low", "high", "log", "step", "choices"}}``, each name a hyperparameter the
fine-tuning API accepts. Every refusal names its field (``search_space.<name>.<field>``).

Writes nothing and reads nothing: the values each parameter can take at its extremes are checked
against the job template by :func:`tuneplex.sweeps.services.sweep_create`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from tuneplex.core.errors import ApiError
from tuneplex.finetuning.services.plan import TUNABLE

TYPES = ("float", "int", "categorical")
MAX_PARAMETERS = 16
MAX_CHOICES = 32
MAX_GRID_POINTS = 10_000
# What a search space may vary: the fine-tuning API's hyperparameters (OpenAI's names and ours).
SEARCHABLE = frozenset(TUNABLE) | {"n_epochs", "learning_rate_multiplier", "beta"}
_FIELDS = {"type", "low", "high", "log", "step", "choices"}


def _error(where: str, message: str, code: str = "invalid_search_space") -> ApiError:
    return ApiError(message, code=code, param=f"search_space{where}")


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


@dataclass(frozen=True)
class Parameter:
    name: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()

    def distribution(self) -> BaseDistribution:
        if self.type == "categorical":
            return CategoricalDistribution(self.choices)
        if self.type == "int":
            return IntDistribution(self.low, self.high, log=self.log, step=self.step or 1)
        return FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def grid(self) -> list:
        """Every value the grid sampler tries (the caller has checked that there are finitely many)."""
        if self.type == "categorical":
            return list(self.choices)
        step = self.step or 1
        count = math.floor((self.high - self.low) / step + 1e-9) + 1
        if self.type == "int":
            return [self.low + i * step for i in range(count)]
        return [round(self.low + i * step, 12) for i in range(count)]

    def extremes(self) -> list[tuple[str, Any]]:
        """(field, value) of the values a trial's job could be refused for, if any."""
        if self.type == "categorical":
            return [(f"choices[{i}]", choice) for i, choice in enumerate(self.choices)]
        return [("low", self.low), ("high", self.high)]

    def stored(self) -> dict[str, Any]:
        if self.type == "categorical":
            return {"type": self.type, "choices": list(self.choices)}
        shown = {"type": self.type, "low": self.low, "high": self.high, "log": self.log}
        if self.step is not None:
            shown["step"] = self.step
        return shown


def parse(search_space: Any, *, grid: bool) -> list[Parameter]:
    """The checked parameters; ``grid``: each must have finitely many values (a step or choices)."""
    if not isinstance(search_space, dict) or not search_space:
        raise _error("", "search_space must be an object of at least one hyperparameter: "
                         "{name: {type, low, high, log?, step?} or {type: categorical, choices}}.")
    if len(search_space) > MAX_PARAMETERS:
        raise _error("", f"At most {MAX_PARAMETERS} hyperparameters in a search space.")
    parameters = [_parameter(name, spec, grid=grid) for name, spec in search_space.items()]
    if grid:
        points = math.prod(len(p.grid()) for p in parameters)
        if points > MAX_GRID_POINTS:
            raise _error("", f"The grid has {points:,} points; at most {MAX_GRID_POINTS:,}.")
    return parameters


def grid_size(parameters: list[Parameter]) -> int:
    return math.prod(len(p.grid()) for p in parameters)


def stored(search_space: dict[str, dict]) -> list[Parameter]:
    """The parameters of a search space as a sweep stores it (checked when it was created)."""
    return [Parameter(name=name, type=spec["type"], low=spec.get("low"), high=spec.get("high"),
                      log=spec.get("log", False), step=spec.get("step"),
                      choices=tuple(spec.get("choices", ())))
            for name, spec in search_space.items()]


def _parameter(name: str, spec: Any, *, grid: bool) -> Parameter:
    at = f".{name}"
    if name not in SEARCHABLE:
        raise _error(at, f"{name!r} is not a hyperparameter a sweep can search; known: "
                         f"{', '.join(sorted(SEARCHABLE))}.")
    if not isinstance(spec, dict):
        raise _error(at, f"search_space.{name} must be an object with a type.")
    unknown = sorted(set(spec) - _FIELDS)
    if unknown:
        raise _error(f"{at}.{unknown[0]}", f"Unknown field {unknown[0]!r}; a parameter has "
                                           f"{', '.join(sorted(_FIELDS))}.")
    kind = spec.get("type")
    if kind not in TYPES:
        raise _error(f"{at}.type", f"type must be one of {', '.join(TYPES)}.")
    if kind == "categorical":
        return _categorical(name, spec, at)
    return _range(name, spec, at, kind, grid=grid)


def _categorical(name: str, spec: dict, at: str) -> Parameter:
    extra = sorted(set(spec) & {"low", "high", "log", "step"})
    if extra:
        raise _error(f"{at}.{extra[0]}", f"A categorical parameter has choices, not {extra[0]}.")
    choices = spec.get("choices")
    if not isinstance(choices, list) or not 1 <= len(choices) <= MAX_CHOICES:
        raise _error(f"{at}.choices", f"choices must be a list of 1 to {MAX_CHOICES} values.")
    for i, choice in enumerate(choices):
        if not (isinstance(choice, (str, bool)) or _is_number(choice)):
            raise _error(f"{at}.choices[{i}]", "Each choice is a string, a number, true or false.")
        if any(choice == other and isinstance(choice, bool) == isinstance(other, bool)
               for other in choices[:i]):
            raise _error(f"{at}.choices[{i}]", f"{choice!r} is listed twice.")
    return Parameter(name=name, type="categorical", choices=tuple(choices))


def _range(name: str, spec: dict, at: str, kind: str, *, grid: bool) -> Parameter:
    if "choices" in spec:
        raise _error(f"{at}.choices", f"A {kind} parameter has low and high; choices are for "
                                      "type categorical.")
    is_int = kind == "int"
    for field in ("low", "high"):
        value = spec.get(field)
        if field not in spec or not _is_number(value) or (is_int and not isinstance(value, int)):
            raise _error(f"{at}.{field}", f"{field} must be {'an integer' if is_int else 'a number'}.")
    low, high = spec["low"], spec["high"]
    if not low < high:
        raise _error(f"{at}.high", f"high must be greater than low ({low}).")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise _error(f"{at}.log", "log must be true or false.")
    if log and low <= 0:
        raise _error(f"{at}.low", "A log-scaled range starts above 0.")
    step = spec.get("step")
    if step is not None:
        if not _is_number(step) or step <= 0 or (is_int and not isinstance(step, int)):
            raise _error(f"{at}.step", f"step must be a positive {'integer' if is_int else 'number'}.")
        if log:
            raise _error(f"{at}.step", "A log-scaled range takes no step (Optuna samples it "
                                       "continuously on the log scale).")
        if step > high - low:
            raise _error(f"{at}.step", f"step is larger than the range ({high - low}).")
    if grid and kind == "float" and step is None:
        raise _error(f"{at}.step", "The grid sampler needs a step for a float range (or give "
                                   "its values as a categorical parameter).")
    return Parameter(name=name, type=kind, low=low, high=high, log=log, step=step)
