"""sifpy.util.lean: the run-time NamedTuple and IntEnum behave like typing's and enum's for
everything sifpy uses (each check runs on both and compares)."""

from __future__ import annotations

import enum
import pickle
import typing
from typing import Any

import pytest

from sifpy.util import lean


def make_records(base: Any) -> Any:
    class Point(base):  # type: ignore[misc, valid-type]
        """A point."""

        x: int
        y: str = "a"
        z: tuple[int, ...] = ()

        def both(self) -> str:
            return f"{self.x}{self.y}"

    return Point


RECORD_CHECKS = {
    "repr": lambda P: repr(P(1)),
    "fields": lambda P: (P._fields, P._field_defaults),
    "defaults": lambda P: tuple(P(1, z=(2,))),
    "keywords": lambda P: tuple(P(y="b", x=3)),
    "replace": lambda P: tuple(P(1)._replace(y="q")),
    "make": lambda P: tuple(P._make([4, "d", (5,)])),
    "asdict": lambda P: P(1)._asdict(),
    "method": lambda P: P(7).both(),
    "doc": lambda P: P.__doc__,
    "tuple": lambda P: (isinstance(P(1), tuple), P(1)[0], list(P(1)), P(1) == (1, "a", ())),
    "hash": lambda P: hash(P(1)) == hash((1, "a", ())),
    "unpack": lambda P: (lambda x, y, z: (x, y, z))(*P(2)),
    "attribute": lambda P: (P(2).x, P(2).y),
    "missing": lambda P: _raises(lambda: P()),
    "too many": lambda P: _raises(lambda: P(1, 2, 3, 4)),
    "unknown keyword": lambda P: _raises(lambda: P(1, w=2)),
    "replace unknown": lambda P: _raises(lambda: P(1)._replace(w=2)),
    "immutable": lambda P: _raises(lambda: setattr(P(1), "x", 2)),
}


def _raises(fn: Any) -> str | None:
    try:
        fn()
    except Exception as exc:
        return type(exc).__name__
    return None


@pytest.mark.parametrize("check", sorted(RECORD_CHECKS))
def test_record_matches_typing_namedtuple(check: str) -> None:
    ours = RECORD_CHECKS[check](make_records(lean.NamedTuple))
    real = RECORD_CHECKS[check](make_records(typing.NamedTuple))
    assert ours == real


def test_record_default_order_is_enforced() -> None:
    with pytest.raises(TypeError):

        class Bad(lean.NamedTuple):  # type: ignore[misc]
            x: int = 1
            y: int


def make_enum(base: Any) -> Any:
    class Color(base):  # type: ignore[misc, valid-type]
        RED = 1
        GREEN = 2
        LIME = 2  # an alias
        BLUE = 0x400A

    return Color


ENUM_CHECKS = {
    "repr": lambda C: (repr(C.RED), repr(C(2))),
    "str": lambda C: (str(C.RED), f"{C.BLUE}", f"{C.BLUE:#x}", "%d" % C.GREEN),  # noqa: UP031
    "lookup": lambda C: (C(1) is C.RED, C["GREEN"] is C.GREEN, C(C.RED) is C.RED),
    "alias": lambda C: (C.LIME is C.GREEN, C.LIME.name, list(C.__members__)),
    "iterate": lambda C: ([m.name for m in C], len(C)),
    "int": lambda C: (C.RED == 1, C.RED + 1, {1: "x"}[C.RED], sorted([C.BLUE, C.RED])),
    "name value": lambda C: (C.BLUE.name, C.BLUE.value, type(C.BLUE.value)),
    "isinstance": lambda C: (isinstance(C.RED, C), isinstance(C.RED, int), isinstance(1, C)),
    "bad value": lambda C: _raises(lambda: C(7)),
    "bad name": lambda C: _raises(lambda: C["PINK"]),
    "reassign": lambda C: _raises(lambda: setattr(C, "RED", 3)),
    "hash": lambda C: hash(C.BLUE) == hash(0x400A),
}


@pytest.mark.parametrize("check", sorted(ENUM_CHECKS))
def test_enum_matches_enum_intenum(check: str) -> None:
    ours = ENUM_CHECKS[check](make_enum(lean.IntEnum))
    real = ENUM_CHECKS[check](make_enum(enum.IntEnum))
    assert ours == real


def test_suppress() -> None:
    with lean.suppress(KeyError, ValueError):
        raise ValueError("x")
    with pytest.raises(TypeError), lean.suppress(KeyError):
        raise TypeError("y")


class Pickled(lean.NamedTuple):
    x: int
    y: str = "a"


class PickledEnum(lean.IntEnum):
    ONE = 1


def test_pickle_round_trip() -> None:
    assert pickle.loads(pickle.dumps(Pickled(1, "b"))) == Pickled(1, "b")
    assert pickle.loads(pickle.dumps(PickledEnum.ONE)) is PickledEnum.ONE
