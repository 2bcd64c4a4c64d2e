"""The settings of a run as types: each setting's type, default and allowed range, declared once.

:class:`RunSettings` holds every setting a user types (``n_examples=200``,
``ray.num_cpus=2``), :class:`~harness.run.scheduler.RayOptions` those under
``ray``. Hydra takes the defaults from here (:func:`hydra_defaults`, the
``run_settings`` node the entry point registers), and :func:`check_settings`
checks a composed configuration against the field types and the ranges
declared beside them, naming every bad value and what is allowed.

Hydra gets the defaults as plain values, not as a typed schema, so that a
value of the wrong type typed on the command line is refused by the same
check, with the same message and exit code, as a value out of range.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import numbers
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping

from .scheduler import Executor, RayOptions

__all__ = ["RAY_OPTIONS_ALLOWED", "Allowed", "RunSettings", "check_settings", "hydra_defaults", "setting"]


@dataclass(frozen=True)
class Allowed:
    """What a setting allows beyond its type, and the words that say so.

    Attributes
    ----------
    at_least, above : float or None
        Bounds of a number.
    non_empty : bool
        A string or list must not be empty.
    rule : callable or None
        A further condition on a value of the right type.
    null_means : str or None
        What null stands for, said beside it ("null (all CPUs)").
    hint : str or None
        Said after the description, in parentheses.
    words : str or None
        The whole description, where the types' own would not say it.
    """

    at_least: float | None = None
    above: float | None = None
    non_empty: bool = False
    rule: Callable[[Any], bool] | None = None
    null_means: str | None = None
    hint: str | None = None
    words: str | None = None


def setting(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, **allowed: Any) -> Any:
    """A dataclass field whose metadata declares what it allows (the keywords of :class:`Allowed`)."""
    return field(default=default, default_factory=default_factory, metadata={"allowed": Allowed(**allowed)})


_RAY_ADDRESSES = "null (an embedded Ray), auto, host:port or ray://host:port"
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def _fraction_or_whole(gpus: float) -> bool:
    # Ray takes a fraction of one GPU, or whole GPUs: 1.5 is refused when the actors start.
    return gpus <= 1 or float(gpus).is_integer()


RAY_OPTIONS_ALLOWED = {
    "address": Allowed(non_empty=True, words=_RAY_ADDRESSES),
    "gpus_per_actor": Allowed(above=0, rule=_fraction_or_whole, hint="a fraction up to 1, or a whole number"),
    "cpus_per_actor": Allowed(at_least=1),
    "max_retries": Allowed(at_least=0),
    "num_cpus": Allowed(at_least=1, null_means="all CPUs"),
}
"""What each field of :class:`~harness.run.scheduler.RayOptions` allows; declared here since that
dataclass belongs to the scheduler, whose defaults it keeps."""


@dataclass(frozen=True)
class RunSettings:
    """Every setting of a run but the grid: the one place their defaults and allowed values are declared.

    The fields are the keys of the composed configuration (``grid`` aside);
    ``docs/run.md`` describes each.
    """

    executor: Executor = setting(Executor.RAY)
    n_examples: None | int = setting(None, at_least=1, null_means="the grid's")
    seed: None | int = setting(None, at_least=0, null_means="the grid's")
    models: None | str | list[str] = setting(
        None, non_empty=True, words="null (the grid's own) or a list of registered model names, e.g. models=[mnist/standard]"
    )
    data_root: str = setting(
        default_factory=lambda: os.environ.get("DATA_ROOT", "data"), non_empty=True,
        hint="the folder that holds the data sets; default $DATA_ROOT, else data",
    )
    weights_dir: None | str = setting(None, non_empty=True, null_means="$WASSERSTEIN_BENCH_WEIGHTS, else the cache folder")
    download: bool = setting(False)
    results_dir: str = setting("results", non_empty=True, hint="the folder the results go to")
    device: str = setting("auto", rule=_DEVICE.fullmatch, words="auto, cpu, cuda or cuda:N")
    batch_size: Literal["auto"] | int = setting("auto", at_least=1)
    verify_workers: Literal["auto"] | int = setting("auto", at_least=0)
    dry_run: bool = setting(False)
    train_missing: bool = setting(False)
    gallery_examples: int = setting(8, at_least=0)
    report: bool = setting(True)
    plugins: list[str] = setting(default_factory=list)
    ray: RayOptions = field(default_factory=RayOptions)


def hydra_defaults() -> dict[str, Any]:
    """The defaults of :class:`RunSettings` as plain values: the node Hydra composes the grid onto."""
    return _plain(RunSettings())


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {item.name: _plain(getattr(value, item.name)) for item in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    return value


def check_settings(config: Mapping[str, Any]) -> tuple[RunSettings, dict[str, str]]:
    """Check the settings of a composed configuration against the types and ranges of :class:`RunSettings`.

    Parameters
    ----------
    config : mapping
        Setting names to values (a missing one takes its default); ``grid``
        is left to the grid's own checks.

    Returns
    -------
    settings : RunSettings
        The values, an enum's converted to its member; a bad value replaced
        by its default, so a run may use them only when there are no problems.
    problems : dict of str to str
        The problem of each bad setting, by its dotted name (``ray.num_cpus``),
        unknown names included; empty when every setting is good.
    """
    problems: dict[str, str] = {}
    settings = _checked(RunSettings, {key: value for key, value in config.items() if key != "grid"}, "", problems)
    return settings, problems


def _checked(schema: type, values: Mapping[str, Any], prefix: str, problems: dict[str, str]) -> Any:
    fields = dataclasses.fields(schema)
    unknown = sorted(set(values) - {item.name for item in fields})
    if unknown:
        problems[prefix + unknown[0]] = (
            f"unknown setting(s) {', '.join(prefix + name for name in unknown)}; "
            f"allowed: {', '.join(prefix + item.name for item in fields)}"
        )
    hints = typing.get_type_hints(schema)
    good = {}
    for item in fields:
        if item.name not in values:
            continue
        value, kind, name = values[item.name], hints[item.name], prefix + item.name
        if dataclasses.is_dataclass(kind):
            if value is None:
                continue
            if isinstance(value, Mapping):
                good[item.name] = _checked(kind, value, name + ".", problems)
            else:
                options = ", ".join(f"{name}.{option.name}" for option in dataclasses.fields(kind))
                problems[name] = f"{name}={value!r} is invalid: it must be a mapping of {options}"
            continue
        allowed = item.metadata.get("allowed") or _ALLOWED_ELSEWHERE.get(schema, {}).get(item.name, Allowed())
        if _matches(value, kind, allowed):
            good[item.name] = kind(value) if isinstance(kind, type) and issubclass(kind, enum.Enum) else value
        else:
            problems[name] = f"{name}={value!r} is invalid: it must be {_described(kind, allowed)}"
    return schema(**good)


_ALLOWED_ELSEWHERE = {RayOptions: RAY_OPTIONS_ALLOWED}
"""What the fields of dataclasses defined outside this module allow."""


def _members(kind: Any) -> tuple:
    return typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)


def _matches(value: Any, kind: Any, allowed: Allowed) -> bool:
    return any(_matches_one(value, member, allowed) for member in _members(kind))


def _matches_one(value: Any, kind: Any, allowed: Allowed) -> bool:
    if kind is type(None):
        return value is None
    if typing.get_origin(kind) is Literal:
        return isinstance(value, str) and value in typing.get_args(kind)
    if typing.get_origin(kind) is list:
        (item_kind,) = typing.get_args(kind)
        return (
            isinstance(value, (list, tuple)) and bool(value or not allowed.non_empty)
            and all(_matches_one(item, item_kind, Allowed()) for item in value)
        )
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return value in {member.value for member in kind}
    if kind is bool:
        return isinstance(value, bool)
    if kind is str:
        valid = isinstance(value, str) and bool(value or not allowed.non_empty)
    elif kind is int:
        valid = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    elif kind is float:
        valid = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    else:
        raise TypeError(f"a setting of type {kind!r} cannot be checked; allowed types: bool, int, float, str, list, Literal, Enum, None")
    if not valid:
        return False
    in_range = kind is str or (
        (allowed.at_least is None or value >= allowed.at_least) and (allowed.above is None or value > allowed.above)
    )
    return in_range and (allowed.rule is None or bool(allowed.rule(value)))


def _described(kind: Any, allowed: Allowed) -> str:
    """What a setting allows in words: ``"null (all CPUs) or an integer >= 1"``."""
    if allowed.words is not None:
        return allowed.words
    members = sorted(_members(kind), key=lambda member: (member is not type(None), typing.get_origin(member) is not Literal))
    words = [_described_one(member, allowed) for member in members]
    described = words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"
    return f"{described} ({allowed.hint})" if allowed.hint else described


def _described_one(kind: Any, allowed: Allowed) -> str:
    if kind is type(None):
        return f"null ({allowed.null_means})" if allowed.null_means else "null"
    if typing.get_origin(kind) is Literal:
        return " or ".join(typing.get_args(kind))
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        values = [member.value for member in kind]
        return f"{', '.join(values[:-1])} or {values[-1]}"
    if kind is bool:
        return "true or false"
    if typing.get_origin(kind) is list:
        return "a non-empty list of strings" if allowed.non_empty else "a list of strings"
    if kind is str:
        return "a non-empty string" if allowed.non_empty else "a string"
    bound = (
        f" >= {allowed.at_least:g}" if allowed.at_least is not None else f" > {allowed.above:g}" if allowed.above is not None else ""
    )
    return f"an integer{bound}" if kind is int else f"a number{bound}"
