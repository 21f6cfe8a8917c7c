"""One name -> entry registry, used for everything chosen by name: merge methods, Stage 1 selection
strategies, the offline suites (mergekit-style: adding one is one new entry)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries by name, in registration order; an unknown name is a ``ValueError`` listing the known ones."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` under ``name`` (a second entry with the same name is an error); returns it."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def __getitem__(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; expected one of {', '.join(sorted(self))}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def values(self) -> list[T]:
        """The entries, in registration order."""
        return list(self._entries.values())


def with_defaults(kind: str, name: str, defaults: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` over an entry's ``defaults``; a name it does not have is a ValueError naming it and the known ones."""
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ValueError(f"{kind} {name!r} has no parameter(s) {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(defaults)) or 'none'}")
    return {**defaults, **params}
