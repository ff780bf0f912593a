"""argparse flags generated from a settings model (see :mod:`ggufship.options`): the flag name,
metavar, help (the field's description, its default and bounds) all come from the model, so a
command declares none of them again. Flags default to "not given" (the model's default, or its
environment variable, then applies); :func:`given` returns what was given, as model input."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

from ggufship.options import Option, model_input, options_of

_DEST = "opt__"


def add_model_flags(
    parser: argparse.ArgumentParser,
    model: type[BaseModel],
    *,
    exclude: Sequence[str] = (),
    groups: dict[str, str] | None = None,
) -> tuple[Option, ...]:
    """Add one flag per option of ``model`` to ``parser``, in argument groups per nested model
    (``groups`` titles them: group key → title). Returns the options (for :func:`given`)."""
    options = options_of(model, exclude=exclude)
    made: dict[str, Any] = {}
    for opt in options:
        if opt.group not in made:
            made[opt.group] = parser.add_argument_group((groups or {}).get(opt.group, opt.group))
        group = made[opt.group]
        kwargs: dict[str, Any] = {
            "dest": _DEST + opt.name,
            "default": None,
            "help": opt.help().replace("%", "%%"),
        }
        if opt.is_bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["metavar"] = opt.metavar or opt.name.upper()
            if opt.is_list and opt.repeat:
                kwargs["action"] = "append"
        group.add_argument(opt.flag, **kwargs)
    return options


def given(args: argparse.Namespace, options: Sequence[Option]) -> dict[str, Any]:
    """The nested model input of the flags given on the command line."""
    values: dict[str, list[Any]] = {}
    for opt in options:
        value = getattr(args, _DEST + opt.name, None)
        if value is None:
            continue
        values[opt.name] = list(value) if isinstance(value, list) else [value]
    return model_input(options, values)


def spell(opt: Option) -> str:
    """How errors name an option on the command line."""
    return opt.flag
