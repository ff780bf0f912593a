"""argparse arguments generated from a settings model (see :mod:`ggufship.options`): the flag
name, short alias, metavar, choices, help (the field's description, its default, bounds and
environment variable) all come from the model, so a command declares none of them again.

Flags default to "not given" (the model's default, or its environment variable, then applies);
:func:`given` returns what was given, as model input. A command that passes ``into=`` gets its
model built right after parsing by :func:`resolve` (called by ``ggufship.cli.main``): the
validated model is ``args.<into>`` and each top-level field is also ``args.<field>``; a bad value
raises the command's error naming the flag (``--port: Input should be ≤ 65535``).

Every argparse action made here carries :data:`MARK` (its :class:`~ggufship.options.Option`), so
a test can tell generated arguments from hand-written ones.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from ggufship.options import Option, model_input, options_of, validated

_DEST = "opt__"
_SPEC = "model_spec__"
#: The attribute every generated argparse action carries: its Option.
MARK = "ggufship_option"
#: The attribute holding the help sections add_model_flags made on a parser (title → group).
_SECTIONS = "ggufship_sections"


@dataclass(frozen=True)
class _Spec:
    """What :func:`resolve` builds after parsing: ``model`` from ``options`` into ``args.<into>``."""

    model: type[BaseModel]
    options: tuple[Option, ...]
    into: str
    error: Callable[[str], Exception]
    spread: bool


class LazyArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose arguments may be added when it is first used (parsed, or its help or
    usage shown): a command whose model lives in a package with heavy imports (``ggufship.serve``
    pulls in FastAPI) costs nothing to the other commands. Subparsers are of the same class."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deferred: list[Callable[[], object]] = []
        self._subcommands: list[argparse.Action] = []

    def add_subparsers(self, **kwargs: Any) -> Any:
        action = super().add_subparsers(**kwargs)
        self._subcommands.append(action)  # remembered for materialize_all (argparse lists none)
        return action

    def subcommand_parsers(self) -> list[argparse.ArgumentParser]:
        """The parsers of this parser's subcommands (one per name; aliases not repeated)."""
        found: list[argparse.ArgumentParser] = []
        for action in self._subcommands:
            for sub in (action.choices or {}).values():  # type: ignore[union-attr]
                if all(sub is not seen for seen in found):
                    found.append(sub)
        return found

    def defer(self, add: Callable[[], object]) -> None:
        self._deferred.append(add)

    def materialize(self) -> None:
        """Run every deferred ``add`` now (idempotent)."""
        while self._deferred:
            self._deferred.pop(0)()

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self.materialize()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self.materialize()
        return super().format_usage()

    def format_help(self) -> str:
        self.materialize()
        return super().format_help()


def deferred(parser: argparse.ArgumentParser, add: Callable[[], object]) -> None:
    """Call ``add`` (which adds ``parser``'s arguments) when ``parser`` is first used, if it is a
    :class:`LazyArgumentParser`; else now."""
    if isinstance(parser, LazyArgumentParser):
        parser.defer(add)
    else:
        add()


def materialize_all(parser: argparse.ArgumentParser) -> None:
    """Add every deferred argument of ``parser`` and of its subparsers, recursively (for tools
    that inspect the whole tree)."""
    if not isinstance(parser, LazyArgumentParser):
        return
    parser.materialize()
    for sub in parser.subcommand_parsers():
        materialize_all(sub)


def env_name(model: type[BaseModel], opt: Option) -> str | None:
    """The environment variable a settings model reads for a top-level option (None otherwise)."""
    if len(opt.path) != 1 or not hasattr(model, "settings_customise_sources"):
        return None
    prefix = model.model_config.get("env_prefix") or ""  # type: ignore[attr-defined]
    field = model.model_fields[opt.path[0]]
    if field.validation_alias is not None or field.alias is not None:
        return None
    return (prefix + opt.path[0]).upper()


def _help(model: type[BaseModel], opt: Option) -> str:
    """The option's help (description, default, bounds), then the environment variable."""
    env = env_name(model, opt)
    text = opt.help() if env is None else f"{opt.help()} (env {env})"
    return text.replace("%", "%%")


def add_model_flags(
    parser: argparse.ArgumentParser,
    model: type[BaseModel],
    *,
    exclude: Sequence[str] = (),
    only: Sequence[str] | None = None,
    groups: dict[str, str] | None = None,
    into: str | None = None,
    error: Callable[[str], Exception] | None = None,
    spread: bool = True,
) -> tuple[Option, ...]:
    """Add one argument per option of ``model`` to ``parser``, in argument groups per nested model
    (``groups`` titles them: group key → title; ``"options"``: the top level, default the parser
    itself). With ``into``, :func:`resolve` builds the model after parsing (``error``: the exception
    a bad value raises, default :class:`~ggufship.errors.UsageError`; ``spread``: also set each
    top-level field on the namespace; ``only``: the fields that get a flag, the rest come from the
    environment or their default). Returns the options (for :func:`given`)."""
    if only is not None:
        exclude = [*exclude, *(f for f in model.model_fields if f not in only)]
    options = tuple(o for o in options_of(model, exclude=exclude) if o.has_flag)
    made: dict[str, Any] = {}
    exclusive: dict[str, Any] = {}
    for opt in options:
        if opt.group not in made:
            title = (groups or {}).get(opt.group)
            made[opt.group] = (
                parser if title is None and opt.group == "options" else _section(parser, title or opt.group)
            )
        target = made[opt.group]
        if opt.exclusive is not None:
            if opt.exclusive not in exclusive:
                required = any(o.one_required for o in options if o.exclusive == opt.exclusive)
                exclusive[opt.exclusive] = target.add_mutually_exclusive_group(required=required)
            target = exclusive[opt.exclusive]
        kwargs: dict[str, Any] = {"help": _help(model, opt)}
        choices = opt.choices if not opt.is_list or opt.repeat or opt.positional else None  # not "a,b"
        if choices is not None:
            kwargs["choices"] = choices
        if opt.positional:
            names = [_DEST + opt.name]
            kwargs["metavar"] = opt.metavar or opt.name
            if opt.is_list:
                kwargs["nargs"] = "+" if _required(opt) else "*"
            elif not _required(opt):
                kwargs["nargs"] = "?"
            kwargs["default"] = None
        else:
            names = ([opt.short] if opt.short else []) + [opt.flag]
            kwargs["dest"] = _DEST + opt.name
            kwargs["default"] = None
            if opt.negative is not None:  # --s3-secure / --s3-insecure: True, False or not given
                pair = target.add_mutually_exclusive_group()
                off = pair.add_argument(
                    "--" + opt.negative.replace("_", "-"),
                    dest=_DEST + opt.name,
                    action="store_false",
                    default=None,
                    help=f"the opposite of {opt.flag}",
                )
                setattr(off, MARK, opt)
                target = pair
                kwargs["action"] = "store_true"
            elif opt.action in ("store_true", "count"):
                kwargs["action"] = opt.action
            elif opt.is_bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                if opt.metavar or choices is None:
                    kwargs["metavar"] = opt.metavar or _metavar(opt)
                if opt.is_list and opt.repeat:
                    kwargs["action"] = "append"
            if _required(opt) and opt.exclusive is None and not hasattr(model, "settings_customise_sources"):
                kwargs["required"] = True
        action = target.add_argument(*names, **kwargs)
        setattr(action, MARK, opt)
    if into is not None:
        if error is None:
            from ggufship.errors import UsageError

            error = UsageError
        parser.set_defaults(**{_SPEC + into: _Spec(model, options, into, error, spread)})
    return options


def _section(parser: argparse.ArgumentParser, title: str) -> Any:
    """The help section (argument group) ``title`` of ``parser``: the one an earlier
    :func:`add_model_flags` call made, else a new one. Two models' options with the same group
    share one section (``publish``: ``--state-dir`` of :class:`~ggufship.services.StateDirSettings`
    among the S3 options)."""
    sections: dict[str, Any] | None = getattr(parser, _SECTIONS, None)
    if sections is None:
        sections = {}
        setattr(parser, _SECTIONS, sections)
    if title not in sections:
        sections[title] = parser.add_argument_group(title)
    return sections[title]


def _metavar(opt: Option) -> str:
    from ggufship.options import _item

    item = _item(opt.field.annotation)
    return {Path: "PATH", int: "N", float: "NUM"}.get(item, opt.name.upper())


def _required(opt: Option) -> bool:
    from pydantic_core import PydanticUndefined

    return opt.default is PydanticUndefined


def given(args: argparse.Namespace, options: Sequence[Option]) -> dict[str, Any]:
    """The nested model input of the flags given on the command line."""
    values: dict[str, list[Any]] = {}
    for opt in options:
        value = getattr(args, _DEST + opt.name, None)
        if value is None or (opt.positional and opt.is_list and value == []):
            continue
        values[opt.name] = list(value) if isinstance(value, list) else [value]
    return model_input(options, values)


def _absolute(opt: Option, value: Any) -> Any:
    """A path option's text as an absolute path (a URI, for ``uri`` options, unchanged)."""
    from ggufship.cli.paths import local_or_uri

    if isinstance(value, list | tuple):
        return type(value)(_absolute(opt, v) for v in value)
    if not isinstance(value, str):
        return value
    if opt.uri:
        return local_or_uri(value)
    if opt.is_path and value:
        return str(Path(value).expanduser().absolute())
    return value


def spell(opt: Option) -> str:
    """How errors name an option on the command line."""
    return opt.flag


def _spell_given(args: argparse.Namespace, model: type[BaseModel]) -> Callable[[Option], str]:
    """Errors name the flag and the value given (``--steps '5,x'``); an option not given is named
    with its environment variable, where the bad value came from (``--port / GGUFSHIP_SERVE_PORT``)."""

    def spell_with_value(opt: Option) -> str:
        value = getattr(args, _DEST + opt.name, None)
        if isinstance(value, str):
            return f"{opt.flag} {value!r}"
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return f"{opt.flag} {' '.join(map(repr, value))}"
        env = env_name(model, opt)
        return f"{opt.flag} / {env}" if value is None and env is not None else opt.flag

    return spell_with_value


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Build every model the parsed command declared (``add_model_flags(into=...)``), in place."""
    for key in [k for k in vars(args) if k.startswith(_SPEC)]:
        spec: _Spec = getattr(args, key)
        delattr(args, key)
        data = given(args, spec.options)
        for opt in spec.options:
            if opt.is_path or opt.uri:
                node = data
                for part in opt.path[:-1]:
                    node = node.get(part, {})
                if opt.path[-1] in node:
                    node[opt.path[-1]] = _absolute(opt, node[opt.path[-1]])
        value = validated(
            spec.model, data, spec.options, spell=_spell_given(args, spec.model), error=spec.error
        )
        setattr(args, spec.into, value)
        if spec.spread:
            for name in type(value).model_fields:
                setattr(args, name, getattr(value, name))
    return args
