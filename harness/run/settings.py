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
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from .fields import Allowed, described, matches, setting

__all__ = ["RAY_ADDRESSES", "Executor", "RayOptions", "RunSettings", "check_settings", "hydra_defaults"]


RAY_ADDRESSES = "null (an embedded Ray), auto, host:port or ray://host:port"
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def _fraction_or_whole(gpus: float) -> bool:
    # Ray takes a fraction of one GPU, or whole GPUs: 1.5 is refused when the actors start.
    return gpus <= 1 or float(gpus).is_integer()


class Executor(enum.Enum):
    """Where shards run."""

    LOCAL = "local"
    """In this process, one shard after another (debugging, tests, small runs)."""
    RAY = "ray"
    """On a pool of Ray actors: an embedded local Ray, or an existing cluster."""


@dataclass(frozen=True)
class RayOptions:
    """How the Ray executor finds its cluster and sizes its actors.

    Attributes
    ----------
    address : str or None
        None starts an embedded Ray on this machine; ``"auto"`` or
        ``"ray://host:port"`` / ``"host:port"`` joins an existing cluster.
    gpus_per_actor : float
        GPU share of an actor when the cluster has GPUs (1: one actor per GPU).
    cpus_per_actor : int
        CPUs of an actor (and its torch threads) when the cluster has no GPU.
    max_retries : int
        Times a shard that raised is run again before the run gives up on it.
    num_cpus : int or None
        CPUs of an embedded Ray (None: all of this machine's).
    """

    address: str | None = setting(None, non_empty=True, words=RAY_ADDRESSES)
    gpus_per_actor: float = setting(1.0, above=0, rule=_fraction_or_whole, hint="a fraction up to 1, or a whole number")
    cpus_per_actor: int = setting(1, at_least=1)
    max_retries: int = setting(2, at_least=0)
    num_cpus: int | None = setting(None, at_least=1, null_means="all CPUs")


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
        allowed = item.metadata.get("allowed", Allowed())
        if matches(value, kind, allowed):
            good[item.name] = kind(value) if isinstance(kind, type) and issubclass(kind, enum.Enum) else value
        else:
            problems[name] = f"{name}={value!r} is invalid: it must be {described(kind, allowed)}"
    return schema(**good)


