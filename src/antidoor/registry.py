"""Name -> factory registries for models, attacks and defenses (timm-style)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from antidoor.errors import AntidoorError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of factories; adding an entry is one decorator in one file.

    >>> MODELS = Registry("model")
    >>> @MODELS.register("tiny")
    ... def tiny(num_classes: int): ...
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._aliases: dict[str, str] = {}  # old name -> current name, so stored configs and studies keep working

    def register(self, name: str, aliases: tuple[str, ...] = ()) -> Callable[[T], T]:
        def add(obj: T) -> T:
            for n in (name, *aliases):
                if n in self._entries or n in self._aliases:
                    raise KeyError(f"{self.kind} {n!r} is registered twice")
            self._entries[name] = obj
            self._aliases.update(dict.fromkeys(aliases, name))
            return obj

        return add

    def canonical(self, name: str) -> str:
        """The registered name for ``name`` (itself, or the current name of an alias)."""
        return self._aliases.get(name, name)

    def get(self, name: str) -> T:
        try:
            return self._entries[self.canonical(name)]
        except KeyError:
            raise AntidoorError(
                f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
