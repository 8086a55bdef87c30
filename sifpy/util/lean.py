"""Cheap run-time stand-ins for ``typing.NamedTuple`` and ``enum.IntEnum``.

``sifpy exec`` starts once per MPI rank, and on its path importing :mod:`typing` costs
~17 ms and :mod:`enum` ~4 ms (Python 3.11, before any of our code runs). The modules on that
path therefore declare their records and enums with the classes below, which build the same
kind of objects (a tuple subclass with named fields; int subclass members with ``name`` and
``value``) from the same class syntax, with nothing imported. Type checkers see the real
``typing.NamedTuple`` and ``enum.IntEnum`` (the ``TYPE_CHECKING`` branch), so the
declarations are checked exactly as before.

Supported: field defaults, ``_fields``, ``_field_defaults``, ``_make``, ``_replace``,
``_asdict``, methods and properties in the class body; enum lookup by value (``E(2)``) and
name (``E["X"]``), iteration in definition order, aliases, ``__members__``, ``name``,
``value``, ``repr`` and ``str`` as Python 3.11 prints them. Not supported (and not used):
``auto()``, flags, enum members with methods, subclassing a record to add fields.
"""

from __future__ import annotations

TYPE_CHECKING = False  # mypy treats a module-level TYPE_CHECKING as typing.TYPE_CHECKING

if TYPE_CHECKING:
    from enum import IntEnum as IntEnum
    from typing import NamedTuple as NamedTuple
else:
    from _operator import itemgetter

    class _RecordMeta(type):
        def __new__(mcls, name, bases, ns):
            if not bases:  # NamedTuple itself
                return super().__new__(mcls, name, bases, ns)
            fields = tuple(ns.get("__annotations__", {}))
            defaults = {f: ns[f] for f in fields if f in ns}
            required = len(fields) - len(defaults)
            if list(defaults) != list(fields[required:]):
                raise TypeError(f"{name}: a field without a default follows one with a default")
            body = {k: v for k, v in ns.items() if k not in defaults}
            body.update(
                __slots__=(),
                _fields=fields,
                _field_defaults=defaults,
                __match_args__=fields,
            )
            for i, f in enumerate(fields):
                body[f] = property(itemgetter(i), doc=f"field {i}: {f}")
            return type(name, (_Record,), body)

    class _Record(tuple):
        __slots__ = ()
        _fields = ()
        _field_defaults = {}  # noqa: RUF012 (replaced in every record class)

        def __new__(cls, *args, **kw):
            fields = cls._fields
            if len(args) == len(fields) and not kw:
                return tuple.__new__(cls, args)
            if len(args) > len(fields):
                raise TypeError(f"{cls.__name__}() takes {len(fields)} arguments")
            values = list(args)
            for f in fields[len(args) :]:
                if f in kw:
                    values.append(kw.pop(f))
                elif f in cls._field_defaults:
                    values.append(cls._field_defaults[f])
                else:
                    raise TypeError(f"{cls.__name__}() missing required argument: '{f}'")
            if kw:
                raise TypeError(f"{cls.__name__}() got unexpected arguments: {', '.join(kw)}")
            return tuple.__new__(cls, values)

        @classmethod
        def _make(cls, iterable):
            values = tuple(iterable)
            if len(values) != len(cls._fields):
                raise TypeError(f"expected {len(cls._fields)} arguments, got {len(values)}")
            return tuple.__new__(cls, values)

        def _replace(self, **kw):
            values = [kw.pop(f, v) for f, v in zip(self._fields, self, strict=True)]
            if kw:
                raise ValueError(f"got unexpected field names: {list(kw)!r}")
            return tuple.__new__(type(self), values)

        def _asdict(self):
            return dict(zip(self._fields, self, strict=True))

        def __getnewargs__(self):
            return tuple(self)

        def __repr__(self):
            inner = ", ".join(f"{f}={v!r}" for f, v in zip(self._fields, self, strict=True))
            return f"{type(self).__name__}({inner})"

    class NamedTuple(metaclass=_RecordMeta):
        """Base class: ``class Point(NamedTuple): x: int; y: int = 0``."""

    class _EnumMeta(type):
        def __new__(mcls, name, bases, ns):
            cls = super().__new__(mcls, name, bases, {})
            members: dict = {}
            by_value: dict = {}
            for key, value in ns.items():
                if key.startswith("_") or not isinstance(value, int) or callable(value):
                    if key != "__qualname__":
                        type.__setattr__(cls, key, value)
                    continue
                member = by_value.get(value)
                if member is None:
                    member = int.__new__(cls, value)
                    member._name_ = key
                    member._value_ = value
                    by_value[value] = member
                members[key] = member
                type.__setattr__(cls, key, member)
            type.__setattr__(cls, "_member_map_", members)
            type.__setattr__(cls, "_value2member_map_", by_value)
            return cls

        def __call__(cls, value):
            if isinstance(value, cls):
                return value
            try:
                return cls._value2member_map_[value]
            except (KeyError, TypeError):
                raise ValueError(f"{value!r} is not a valid {cls.__name__}") from None

        def __getitem__(cls, name):
            return cls._member_map_[name]

        def __iter__(cls):
            return iter(cls._value2member_map_.values())

        def __len__(cls):
            return len(cls._value2member_map_)

        def __contains__(cls, value):
            return isinstance(value, cls) or value in cls._value2member_map_

        def __setattr__(cls, key, value):
            if key in cls.__dict__.get("_member_map_", ()):
                raise AttributeError(f"cannot reassign member {key!r}")
            type.__setattr__(cls, key, value)

        @property
        def __members__(cls):
            return dict(cls._member_map_)

    class IntEnum(int, metaclass=_EnumMeta):
        """Base class: ``class Color(IntEnum): RED = 1``; members are ints."""

        _member_map_ = {}  # noqa: RUF012 (replaced in every enum class)
        _value2member_map_ = {}  # noqa: RUF012

        @property
        def name(self):
            return self._name_

        @property
        def value(self):
            return self._value_

        def __repr__(self):
            return f"<{type(self).__name__}.{self._name_}: {int(self)}>"

        __str__ = int.__repr__
        __format__ = int.__format__

        def __reduce_ex__(self, proto):
            return type(self), (self._value_,)

        def __hash__(self):
            return int.__hash__(self)


if TYPE_CHECKING:
    from contextlib import suppress as suppress
else:

    class suppress:
        """``contextlib.suppress`` without importing contextlib (~4 ms with its imports)."""

        __slots__ = ("_exceptions",)

        def __init__(self, *exceptions):
            self._exceptions = exceptions

        def __enter__(self):
            return None

        def __exit__(self, exc_type, exc, tb):
            return exc_type is not None and issubclass(exc_type, self._exceptions)
