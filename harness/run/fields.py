"""Fields that declare what they allow: the one checker of settings' and grid blocks' values.

A dataclass field made by :func:`setting` carries an :class:`Allowed` in its
metadata: bounds, a rule, the words that say what is allowed. :func:`matches`
checks a value against the field's type (a union, a ``Literal``, an enum, a
list, a number, a string, a bool) and that; :func:`described` says what the
field allows, for a message that names the bad value and the allowed ones.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import numbers
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

__all__ = ["Allowed", "check_field", "described", "matches", "setting"]


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


def _members(kind: Any) -> tuple:
    return typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)


def matches(value: Any, kind: Any, allowed: Allowed) -> bool:
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


def described(kind: Any, allowed: Allowed) -> str:
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


def check_field(schema: type, name: str, value: Any, null: bool = True) -> tuple[bool, Any, str]:
    """``value`` of ``schema``'s field ``name``: whether it fits, the value (an enum's member), and the field in words.

    ``null=False`` checks and describes the field without its None member (a
    grid block's setting, where unset is not a value).
    """
    item = {item.name: item for item in dataclasses.fields(schema)}[name]
    kind = typing.get_type_hints(schema)[name]
    if not null:
        members = [member for member in _members(kind) if member is not type(None)]
        kind = members[0] if len(members) == 1 else typing.Union[tuple(members)]
    allowed = item.metadata.get("allowed", Allowed())
    if not matches(value, kind, allowed):
        return False, None, described(kind, allowed)
    return True, kind(value) if isinstance(kind, type) and issubclass(kind, enum.Enum) else value, described(kind, allowed)

