"""Options of a settings model: one declaration per option, read by every front end.

A pydantic model's fields (with nested models flattened) are the options: the name, type,
default, bounds and help (``description``) come from the field. A field may say how it is
spelled outside Python with ``json_schema_extra=option(...)``: its flag/parameter name (for
names that predate the model, e.g. ``--max-p99`` for ``max_p99_s``), a metavar, whether a
list is given by repeating the option instead of as a comma list, and whether HTTP query
parameters may set it. ``ggufship.cli.settings_flags`` turns these into argparse flags; the
gate server parses its query parameters with :func:`model_input` and :func:`validated`.

Values arrive as text and are validated by the model itself, so a flag, a query parameter and
an environment variable go through the same validators.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

M = TypeVar("M", bound=BaseModel)
_KEY = "ggufship_option"


def option(
    name: str | None = None,
    *,
    metavar: str | None = None,
    repeat: bool = False,
    query: bool = True,
    short: str | None = None,
    positional: bool = False,
    action: str | None = None,
    flag: bool = True,
    exclusive: str | None = None,
    one_required: bool = False,
    uri: bool = False,
    nested: dict[str, dict[str, Any]] | None = None,
    group: str | None = None,
    negative: str | None = None,
) -> dict[str, Any]:
    """``json_schema_extra`` for a field: its option ``name`` (snake case; default the field's name),
    ``metavar``, ``repeat`` (a list given by repeating the option, for values that may hold commas),
    ``query`` (False: not settable by an HTTP query parameter, e.g. where the server connects).

    Command-line spelling: ``short`` (an alias such as ``-o``), ``positional`` (an argument, not a
    flag; optional when the field has a default), ``action`` (``store_true`` for a bool flag without
    ``--no-…``, ``count`` for ``-vv``), ``flag`` (False: no flag, e.g. a secret read only from the
    environment), ``exclusive`` (the mutually exclusive set it belongs to; ``one_required``: one of
    the set must be given) and ``uri`` (a path *or* a URI: a local path is made absolute).

    On a field holding a nested model, ``nested`` maps the nested model's field names to
    ``option(...)`` specs that override theirs: how a command spells a reused model's options
    (``--min-top1`` for ``EvaluatePolicy.min_top1_agreement``). ``group``: the help section (argument
    group) of a top-level field; ``negative``: for a ``bool | None`` field, the name of the flag
    that sets it False (``--s3-insecure`` beside ``--s3-secure``; the two exclude each other)."""
    spec: dict[str, Any] = {"repeat": repeat, "query": query}
    if name is not None:
        spec["name"] = name
    if metavar is not None:
        spec["metavar"] = metavar
    for key, value in (
        ("short", short),
        ("positional", positional),
        ("action", action),
        ("exclusive", exclusive),
        ("one_required", one_required),
        ("uri", uri),
        ("group", group),
        ("negative", negative),
    ):
        if value:
            spec[key] = value
    if not flag:
        spec["flag"] = False
    if nested:
        spec["nested"] = {k: v[_KEY] for k, v in nested.items()}
    return {_KEY: spec}


def switch(description: str, name: str | None = None, *, short: str | None = None) -> Any:
    """A bool field that is off unless its flag is given (``--json``, ``--force``): no ``--no-…``."""
    from pydantic import Field

    return Field(
        default=False,
        description=description,
        json_schema_extra=option(name, short=short, action="store_true"),
    )


@dataclass(frozen=True)
class Option:
    """One option of a model: where it lives (``path``), how it is spelled, and its field."""

    name: str
    path: tuple[str, ...]
    field: FieldInfo
    group: str
    metavar: str | None = None
    repeat: bool = False
    query: bool = True
    short: str | None = None
    positional: bool = False
    action: str | None = None
    has_flag: bool = True
    exclusive: str | None = None
    one_required: bool = False
    uri: bool = False
    negative: str | None = None

    @property
    def flag(self) -> str:
        """How the command line spells it: ``--max-p99``, or the argument's name (``CHECKPOINT``)."""
        if self.positional:
            return self.metavar or self.name.upper()
        return "--" + self.name.replace("_", "-")

    @property
    def choices(self) -> tuple[Any, ...] | None:
        """The values a ``Literal`` or ``Enum`` type (or a list of one) allows; None for other types."""
        return _choices(self.field.annotation)

    @property
    def is_path(self) -> bool:
        """A path (or a list of paths): the command line makes it absolute."""
        return _item(self.field.annotation) is Path

    @property
    def is_list(self) -> bool:
        return _origin(self.field.annotation) in (tuple, list)

    @property
    def is_bool(self) -> bool:
        return _item(self.field.annotation) is bool and not self.is_list

    @property
    def description(self) -> str:
        return self.field.description or ""

    @property
    def default(self) -> Any:
        """The field's default (a factory's value); ``PydanticUndefined`` for a required field."""
        return self.field.get_default(call_default_factory=True)

    def default_text(self) -> str | None:
        value = self.default
        if value is PydanticUndefined:
            return None
        if value is None:
            return "none"
        if isinstance(value, tuple | list):
            return ",".join(map(str, value)) if value else "none"
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, Enum):
            return str(value.value)
        if isinstance(value, float) and value.is_integer():
            return str(int(value))
        return str(value)

    def bounds_text(self) -> str | None:
        parts = []
        for meta in self.field.metadata:
            for attr, sign in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤")):
                bound = getattr(meta, attr, None)
                if bound is not None:
                    parts.append(f"{sign} {bound:g}" if isinstance(bound, float) else f"{sign} {bound}")
        return ", ".join(parts) or None

    def help(self) -> str:
        """The field's description, then what the model says about default and bounds."""
        extra = []
        if (default := self.default_text()) is not None:
            extra.append(f"default: {default}")
        if (bounds := self.bounds_text()) is not None:
            extra.append(bounds)
        return f"{self.description} ({'; '.join(extra)})" if extra else self.description


def _origin(annotation: Any) -> Any:
    origin = get_origin(annotation)
    if origin is None:
        return annotation
    args = [a for a in get_args(annotation) if a is not type(None)]
    if origin in (tuple, list):
        return origin
    if len(args) == 1:  # X | None
        return _origin(args[0])
    return origin


def _item(annotation: Any) -> Any:
    """The type of ``annotation`` without ``| None`` and, for a list, the item type."""
    origin = get_origin(annotation)
    if origin is None or origin is Literal:
        return annotation
    args = [a for a in get_args(annotation) if a is not type(None) and a is not Ellipsis]
    return _item(args[0]) if len(args) == 1 else annotation


def _choices(annotation: Any) -> tuple[Any, ...] | None:
    item = _item(annotation)
    if get_origin(item) is Literal:
        return get_args(item)
    if isinstance(item, type) and issubclass(item, Enum):
        return tuple(member.value for member in item)
    return None


def _nested_model(field: FieldInfo) -> type[BaseModel] | None:
    ann = field.annotation
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def options_of(model: type[BaseModel], *, exclude: Iterable[str] = ()) -> tuple[Option, ...]:
    """Every option of ``model``, nested models' fields flattened (grouped under the field's name).
    Raises ValueError when two options share a name."""
    skip = set(exclude)
    out: list[Option] = []

    def spec_of(field: FieldInfo) -> dict[str, Any]:
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        return dict(extra.get(_KEY) or {})  # type: ignore[call-overload]

    def walk(cls: type[BaseModel], prefix: tuple[str, ...], group: str, overrides: dict[str, Any]) -> None:
        for fname, field in cls.model_fields.items():
            if fname in skip:
                continue
            nested = _nested_model(field)
            if nested is not None:
                walk(nested, (*prefix, fname), fname, dict(spec_of(field).get("nested") or {}))
                continue
            spec = spec_of(field)
            if fname in overrides:
                explicit = {k: v for k, v in overrides[fname].items() if k not in ("repeat", "query")}
                spec = {**spec, **explicit}
            out.append(
                Option(
                    name=spec.get("name", fname),
                    path=(*prefix, fname),
                    field=field,
                    group=spec.get("group", group),
                    metavar=spec.get("metavar"),
                    repeat=bool(spec.get("repeat", False)),
                    query=bool(spec.get("query", True)),
                    short=spec.get("short"),
                    positional=bool(spec.get("positional", False)),
                    action=spec.get("action"),
                    has_flag=bool(spec.get("flag", True)),
                    exclusive=spec.get("exclusive"),
                    one_required=bool(spec.get("one_required", False)),
                    uri=bool(spec.get("uri", False)),
                    negative=spec.get("negative"),
                )
            )

    walk(model, (), "options", {})
    names = [o.name for o in out]
    if len(set(names)) != len(names):
        raise ValueError(
            f"{model.__name__}: option names repeat: {sorted(n for n in names if names.count(n) > 1)}"
        )
    return tuple(out)


def model_input(options: Sequence[Option], values: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
    """The nested input dict of the options present in ``values`` (name → the values given, in
    order). A list option takes every value of a repeatable option, else the last value split at
    commas (an empty value: the empty list); any other option takes its last value."""
    data: dict[str, Any] = {}
    for opt in options:
        given = values.get(opt.name)
        if not given:
            continue
        if opt.is_list:
            if opt.repeat or opt.positional:  # repeated flags, or the words of a list argument
                value: Any = tuple(given)
            else:
                value = tuple(part.strip() for part in str(given[-1]).split(",") if part.strip())
        else:
            value = given[-1]
        node = data
        for key in opt.path[:-1]:
            node = node.setdefault(key, {})
        node[opt.path[-1]] = value
    return data


def deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, nested dicts merged key by key."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def validated(
    model: type[M],
    data: Mapping[str, Any],
    options: Sequence[Option],
    *,
    spell: Callable[[Option], str],
    error: Callable[[str], Exception],
) -> M:
    """``model(**data)``; a validation error becomes ``error(message)`` naming each bad option
    as ``spell`` writes it (``--max-p99``, ``query parameter max_p99``)."""
    by_path = {o.path: o for o in options}
    try:
        return model(**data)
    except ValidationError as exc:
        problems = []
        for e in exc.errors():
            loc = tuple(str(p) for p in e["loc"])
            opt = next((by_path[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in by_path), None)
            where = spell(opt) if opt is not None else ".".join(loc) or "value"
            problems.append(f"{where}: {e['msg']}")
        raise error("; ".join(problems)) from exc
