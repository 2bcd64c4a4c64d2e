"""A name -> spec table, shared by the solver and model catalogues."""

from __future__ import annotations

from typing import ClassVar, Generic, Protocol, TypeVar


class _Named(Protocol):
    name: str


SpecT = TypeVar("SpecT", bound=_Named)


class Registry(Generic[SpecT]):
    """Specs by their ``name``; subclasses say what they hold in ``noun`` (for messages)."""

    noun: ClassVar[str] = "entry"

    def __init__(self, specs: tuple[SpecT, ...] = ()):
        self._specs: dict[str, SpecT] = {}
        for spec in specs:
            self.add(spec)

    def add(self, spec: SpecT) -> None:
        if spec.name in self._specs:
            raise ValueError(f"a {self.noun} named {spec.name!r} is already registered")
        self._specs[spec.name] = spec

    def names(self) -> list[str]:
        return sorted(self._specs)

    def spec(self, name: str) -> SpecT:
        try:
            return self._specs[name]
        except KeyError:
            raise ValueError(f"unknown {self.noun} {name!r}; registered {self.noun}s: {', '.join(self.names())}") from None

    def specs(self) -> list[SpecT]:
        return [self._specs[name] for name in self.names()]
