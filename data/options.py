"""Config options as typer command parameters, and the flag that spells each library parameter.

:func:`configs` gives a command the options of its config groups (:class:`cir_mine.data.fields.Options`)
in place of the config parameters and calls it with the configs built from their values;
:func:`option_flags` maps every parameter a command's options set to its flag, which :func:`flag`
uses to spell the names a library error lists (:meth:`cir_mine.data.errors.CirMineError.render`).
:func:`changed_options` finds the options given on a command line that would change a config.
Nothing here prints or exits.
"""

from __future__ import annotations

import functools
import inspect as pyinspect
import typing
from typing import Optional

import typer
from typer.models import OptionInfo

from cir_mine.data.fields import Options

# library parameters that no option is named after, as every command spells them
ALIASES = {"ws": "--work"}


def sentence(text: str) -> str:
    """A field's comment as help text: prose starts with a capital, and every help ends with a period."""
    words = text.split(" ", 2)
    if len(words) > 1 and words[0].isalpha() and words[0].islower() and words[1][:1].isalpha():
        text = text[0].upper() + text[1:]
    return text if text.endswith(".") else text + "."


def configs(common: dict, **groups: Options):
    """Each parameter of the command named in ``groups`` becomes the options of its config's fields (in
    its place); the command is called with the configs built from their values. Every command has the
    ``common`` options (name -> typer option); a command that does not name them does not get them."""

    def deco(fn):
        hints, params, made = typing.get_type_hints(fn), [], set()
        for p in pyinspect.signature(fn).parameters.values():
            if p.name not in groups:
                params.append(
                    p.replace(kind=pyinspect.Parameter.KEYWORD_ONLY, annotation=hints.get(p.name, p.annotation))
                )
                continue
            for o in groups[p.name].options():
                if o.name not in made:
                    made.add(o.name)
                    params.append(
                        pyinspect.Parameter(
                            o.name,
                            pyinspect.Parameter.KEYWORD_ONLY,
                            annotation=o.type,
                            default=typer.Option(o.default, *o.flags, help=sentence(o.help)),
                        )
                    )
        for name, option in common.items():
            if name not in {p.name for p in params}:
                made.add(name)
                params.append(
                    pyinspect.Parameter(name, pyinspect.Parameter.KEYWORD_ONLY, annotation=bool, default=option)
                )

        @functools.wraps(fn)
        def wrapper(**kw):
            return fn(**{k: v for k, v in kw.items() if k not in made}, **{k: g.make(kw) for k, g in groups.items()})

        wrapper.__signature__ = pyinspect.Signature(params)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        wrapper.option_groups = groups
        return wrapper

    return deco


def option_flags(fn) -> dict:
    """Parameter name -> the flag of the option that sets it, for a command: every option under its
    own name, every config field under its name (unless an option has it) and as ``Class.field``."""
    out = {
        p.name: p.default.param_decls[0].split("/")[0]
        for p in pyinspect.signature(fn).parameters.values()
        if isinstance(p.default, OptionInfo) and p.default.param_decls
    }
    for group in getattr(fn, "option_groups", {}).values():
        for o in group.options():
            out[f"{o.owner.__name__}.{o.field}"] = out[o.name]
            out.setdefault(o.field, out[o.name])
        for field, other in group.shared.items():
            out[f"{group.cls.__name__}.{field}"] = out[other]
    return {**ALIASES, **out}


def flag(param: str, flags: Optional[dict] = None) -> str:
    """The command-line spelling of a library parameter name."""
    return (flags or ALIASES).get(param, "--" + param.replace("_", "-"))


def changed_options(ctx, group: Options, values: dict) -> list:
    """The options given on the command line of ``ctx`` (a click context; None: none) that set a field of
    ``values`` (a config as a dict) to another value: (option name, its value as typed, the field's)."""
    out = []
    for name, value in ctx.params.items() if ctx is not None else ():
        source = ctx.get_parameter_source(name)
        if name not in values or source is None or source.name != "COMMANDLINE":
            continue
        spell = group.spell.get(name)
        if (spell.to_field(value) if spell else value) != values[name]:
            out.append((name, " ".join(map(str, value)) if isinstance(value, (list, tuple)) else value, values[name]))
    return out
