"""The base of the exec path's records: named fields in ``__slots__``, compared by value.

A record is a plain class that lists its fields in ``__slots__`` and sets them in an
``__init__`` with a typed parameter for each; this base adds what every record needs:
iteration in field order (so ``a, b = rec`` and ``struct.pack(*rec)`` work), equality and
hashing by value, a readable ``repr`` and :meth:`replace`. It is neither a dataclass nor a
``typing.NamedTuple`` because ``sifpy exec`` builds its records on every start and importing
dataclasses costs ~10 ms (with inspect), typing ~7.6 ms (python -X importtime -I -S, 2-CPU
Xeon).
"""

from __future__ import annotations

from sifpy import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any, Self


class Record:
    __slots__: tuple[str, ...] = ()

    def __iter__(self) -> Iterator[Any]:
        for name in self.__slots__:
            yield getattr(self, name)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return tuple(self) == tuple(other)

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__)
        return f"{type(self).__name__}({fields})"

    def asdict(self) -> dict[str, Any]:
        return {n: getattr(self, n) for n in self.__slots__}

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes`` (field name -> value)."""
        unknown = set(changes) - set(self.__slots__)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field {', '.join(sorted(unknown))}")
        return type(self)(**(self.asdict() | changes))
