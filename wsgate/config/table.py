"""
Reading one TOML table: typed look-ups that record every problem as ``FILE: key.path: reason``
instead of raising, so all problems of a file are reported at once (like ``nginx -t``).

An optional key's default is the schema's (:mod:`wsgate.config.schema`): :meth:`Table.field` takes
it from the dataclass field, so no default is written twice.  A required key has no default; its
placeholder only stands in while the rest of the file is read, and the file is refused anyway.
This module knows no section of the config and must not build Twisted objects.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

__all__ = ["ConfigError", "Reader", "Table", "default_of"]


class ConfigError(Exception):
    """
    A configuration was refused.  ``problems`` holds one ``FILE: key.path: reason`` line per problem.
    """

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


T = TypeVar("T")


class Table:
    """
    One TOML table being read: typed look-ups that record problems under their key path instead of
    raising, and a final check for keys nobody asked for.
    """

    def __init__(self, reader: Reader, path: str, data: object) -> None:
        self._reader = reader
        self._path = path
        self._data: dict[str, Any] = data if isinstance(data, dict) else {}
        self._seen: set[str] = set()
        if not isinstance(data, dict):
            reader.problem(path, "expected a table")

    @property
    def reader(self) -> Reader:
        """The file this table is part of."""
        return self._reader

    @property
    def path(self) -> str:
        """This table's key path, such as ``upstream.api.servers[2]`` (empty: the top)."""
        return self._path

    def key(self, name: str) -> str:
        """The key path of key ``name`` in this table."""
        return f"{self._path}.{name}" if self._path else name

    def field(self, spec: type, name: str, convert: Callable[[object], T]) -> T:
        """
        Optional key ``name`` converted, or the default of the field of the same name of the
        dataclass ``spec`` when the key is absent (or its value refused, with a problem recorded).
        """
        return self._get(name, default_of(spec, name), convert, required=False)

    def optional(self, name: str, convert: Callable[[object], T]) -> T | None:
        """Optional key ``name`` converted, or None when absent or refused (not a schema field)."""
        return self._get(name, None, convert, required=False)

    def required(self, name: str, convert: Callable[[object], T], placeholder: T) -> T:
        """
        Required key ``name`` converted; when it is absent or refused a problem is recorded and
        ``placeholder`` (never part of a Config: the file is refused) stands in.
        """
        return self._get(name, placeholder, convert, required=True)

    def given(self, name: str) -> bool:
        """Whether the table sets key ``name`` (for checks between keys)."""
        return name in self._data

    def _get(self, name: str, default: T, convert: Callable[[object], T], required: bool) -> T:
        self._seen.add(name)
        if name not in self._data:
            if required:
                self._reader.problem(self.key(name), "required")
            return default
        try:
            return convert(self._data[name])
        except ValueError as e:
            self._reader.problem(self.key(name), str(e))
            return default

    def tables(self, name: str) -> Iterator[Table]:
        """The items of an array of tables (``[[name]]``)."""
        self._seen.add(name)
        items = self._data.get(name, [])
        if not isinstance(items, list):
            self._reader.problem(self.key(name), "expected an array of tables")
            return
        for i, item in enumerate(items):
            yield Table(self._reader, f"{self.key(name)}[{i}]", item)

    def subtables(self, name: str) -> Iterator[tuple[str, Table]]:
        """The named sub-tables of a table (``[name.x]``, ``[name.y]``)."""
        self._seen.add(name)
        items = self._data.get(name, {})
        if not isinstance(items, dict):
            self._reader.problem(self.key(name), "expected a table")
            return
        for sub, item in items.items():
            yield sub, Table(self._reader, f"{self.key(name)}.{sub}", item)

    def subtable(self, name: str) -> Table | None:
        """An optional (inline) sub-table, or None when the key is absent."""
        self._seen.add(name)
        if name not in self._data:
            return None
        return Table(self._reader, self.key(name), self._data[name])

    def done(self) -> None:
        """Record every key of the table nobody asked for as unknown."""
        for name in self._data:
            if name not in self._seen:
                self._reader.problem(self.key(name), "unknown key")


class Reader:
    """One file being read: its name, the directory relative paths start from, its problems."""

    def __init__(self, source: str, base_dir: str | None = None) -> None:
        self.source = source
        self.base_dir = os.path.dirname(source) if base_dir is None else base_dir
        self.problems: list[str] = []

    def problem(self, key: str, reason: str) -> None:
        self.problems.append(f"{self.source}: {key}: {reason}")


def default_of(spec: type, name: str) -> Any:
    """The default of field ``name`` of the dataclass ``spec``; TypeError when it has none."""
    for f in dataclasses.fields(spec):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            raise TypeError(f"{spec.__name__}.{name} has no default")
    raise TypeError(f"{spec.__name__} has no field {name!r}")
