"""Config dataclass fields as a front end's options: the one place a setting's default and meaning
are stated is its field.

A config dataclass states each setting on one line: name, type, default and a comment. A comment
that needs more room continues on the lines below, as comment-only lines indented past the field::

    @dataclass
    class Example:
        k: int = 10                  # negatives per query
        index: str = "flat"          # search back-end: flat (exact) | ivf | hnsw
                                     # (approximate ones are re-ranked exactly)

:func:`field_docs` reads those comments from the source. :class:`Options` describes the options a
front end (the CLI) makes of a config's fields, each named, defaulted and described by its field,
and builds the config back from the options' values; a :class:`Spell` says how an option writes a
field it cannot take as it is (comma-separated numbers, paths). cir_mine.data.options makes typer
parameters of them.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

from cir_mine.data.errors import UsageError


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict:
    """Field name -> its comment (continuation lines joined by a space), for ``cls`` and its dataclass
    bases; a field without a comment maps to ""."""
    docs = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_docs(klass))
    return {f.name: docs.get(f.name, "") for f in dataclasses.fields(cls)}


def _own_docs(cls: type) -> dict:
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (defined in a REPL): no comments
        return {}
    comments = {}  # row -> (column, text)
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = (tok.start[1], tok.string.lstrip("#").strip())
    lines = src.splitlines()
    out = {}
    for node in ast.parse(src).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        parts = [comments[row][1] for row in range(node.lineno, node.end_lineno + 1) if row in comments]
        row = node.end_lineno + 1
        while row in comments and comments[row][0] > node.col_offset and lines[row - 1].lstrip().startswith("#"):
            parts.append(comments[row][1])
            row += 1
        out[node.target.id] = " ".join(p for p in parts if p)
    return out


def field_default(cls: type, name: str):
    """The default of field ``name`` of the dataclass ``cls`` (None for a field without one)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def field_type(cls: type, name: str):
    """The type of field ``name``, ``X | None`` written as ``Optional[X]``."""
    annotation = typing.get_type_hints(cls)[name]
    if isinstance(annotation, types.UnionType):
        args = [a for a in annotation.__args__ if a is not type(None)]
        return Optional[args[0]] if len(args) == 1 else annotation
    return annotation


@dataclass(frozen=True)
class Spell:
    """How an option spells a field it cannot take as it is: the option's type, the option's default
    made from the field's, and the field's value made from the option's."""

    type: object
    to_option: Callable = lambda v: v
    to_field: Callable = lambda v: v


# a path option of a string field (None: unset), of a string field whose unset value is "", of a list field
PATH = Spell(Optional[Path], lambda v: v, lambda p: None if p is None else str(p))
PATH_OR_EMPTY = Spell(Optional[Path], lambda v: Path(v) if v else None, lambda p: str(p) if p else "")
PATHS = Spell(Optional[List[Path]], lambda v: list(v) or None, lambda ps: [str(p) for p in ps or []])


def comma_numbers(name: str) -> Spell:
    """A tuple of floats as comma-separated numbers, e.g. 0.7,0.2,0.1 (``name``: the field, for errors)."""

    def parse(spec: str) -> tuple:
        try:
            return tuple(float(x) for x in spec.split(","))
        except ValueError:
            raise UsageError(
                f"{name} {spec!r}: use comma-separated numbers, e.g. 0.7,0.2,0.1.", params=(name,)
            ) from None

    return Spell(str, lambda v: ",".join(f"{x:g}" for x in v), parse)


@dataclass(frozen=True)
class Option:
    """One option made of a field."""

    # fmt: off
    field: str            # the field it sets
    owner: type           # the dataclass that defines the field
    name: str             # the option's name (the field's unless renamed)
    flags: tuple          # its flags, e.g. ("--batch-size", "-b")
    type: object
    default: object
    help: str
    # fmt: on


@dataclass(frozen=True)
class Options:
    """The options made of the fields of the config dataclass ``cls`` (a config with ``option_fields``,
    such as MineConfig, lends its flat options): one per field, named as the field, with its default
    and its comment as help."""

    # fmt: off
    cls: type
    only: tuple = ()                  # the fields that get an option (empty: all but ``skip``)
    skip: tuple = ()                  # fields left to the API
    names: dict = field(default_factory=dict)   # field -> option name, when not the field's
    flags: dict = field(default_factory=dict)   # field -> flags, when not --option-name
    spell: dict = field(default_factory=dict)   # field -> Spell
    shared: dict = field(default_factory=dict)  # field -> the other option whose value it takes
    lead: str = ""                    # said before every field's comment (e.g. the option it goes with)
    notes: dict = field(default_factory=dict)   # field -> said after its comment
    build: Optional[Callable] = None  # field values -> the config (default: cls(**values))
    # fmt: on

    def options(self) -> list:
        """The options, in the fields' order."""
        classes = (
            self.cls.option_fields()
            if hasattr(self.cls, "option_fields")
            else {f.name: self.cls for f in dataclasses.fields(self.cls)}
        )
        owners = self.cls.option_owners() if hasattr(self.cls, "option_owners") else {}
        out = []
        for name, owner in classes.items():
            if (self.only and name not in self.only) or name in self.skip or name in self.shared:
                continue
            sp = self.spell.get(name)
            default = field_default(owner, name)
            strategy = owners.get(name, "config") not in ("config", "guards")
            help = (
                self.lead
                + (f"{owners[name]}: " if strategy else "")
                + field_docs(owner)[name]
                + self.notes.get(name, "")
            )
            option = self.names.get(name, name)
            out.append(
                Option(
                    name,
                    owner,
                    option,
                    self.flags.get(name, ("--" + option.replace("_", "-"),)),
                    sp.type if sp else field_type(owner, name),
                    sp.to_option(default) if sp else default,
                    help,
                )
            )
        return out

    def make(self, values: dict):
        """The config from the options' values (by option name)."""
        given = {}
        for o in self.options():
            sp = self.spell.get(o.field)
            given[o.field] = sp.to_field(values[o.name]) if sp else values[o.name]
        given.update({name: values[other] for name, other in self.shared.items()})
        return (self.build or self.cls)(**given)
