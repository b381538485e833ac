"""The ``--set key=value`` grammar of every job, and the one way validation errors become messages.

A value is read as the type of the field it sets, so the same text works everywhere:

- scalars as written: ``train.steps=100``, ``optim.lr=3e-4``, ``scratch=true``, ``run.name=123`` (a string, since
  the field is one), ``data.train=gs://b/train-{000000..000099}.tar``;
- ``null`` or ``none`` clears an optional field: ``train.epochs=null``;
- sequences (list and tuple fields) as ``a,b`` or ``[a,b]``; one value is a one-element sequence:
  ``lrs=0.003,0.01``, ``lrs=[0.01]``, ``lrs=0.01``, ``optim.betas=[0.9,0.95]``, ``benchmarks=[cifar10, pets]``.

Anything else is tried as JSON. A value the field's type cannot take is refused with the key, the text and the
type; an unknown key with the closest known one.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import re
import types
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar, Union, get_args, get_origin

import pydantic
from pydantic import BaseModel, TypeAdapter

Model = TypeVar("Model", bound=BaseModel)


class ConfigError(ValueError):
    """One or more configuration problems; each line names the field and what to do."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(problems))


# ---------------------------------------------------------------------------------------------------------
# keys


def split_override(text: str, *, example: str) -> tuple[str, str]:
    """``"a.b=1"`` -> ``("a.b", "1")``; ConfigError with ``example`` when there is no ``key=``."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError([f"--set {text!r}: expected key=value, e.g. --set {example}"])
    return key, raw


def did_you_mean(key: str, known: Iterable[str]) -> str:
    """``"did you mean 'optim.lr'? "`` for ``train.lr``: the same name in another section first, then spelling."""
    known = list(known)
    leaf = key.rsplit(".", 1)[-1]
    close = [k for k in known if k.rsplit(".", 1)[-1] == leaf] or difflib.get_close_matches(
        key, known, n=1, cutoff=0.75
    )
    return f"did you mean {close[0]!r}? " if close else ""


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def leaf_keys(schema: type[BaseModel], prefix: str = "") -> list[str]:
    """Every settable dotted key of a nested schema, e.g. ``train.steps``."""
    keys = []
    for name, field in schema.model_fields.items():
        if _is_section(field.annotation):
            keys += leaf_keys(field.annotation, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def field_annotation(schema: type[BaseModel], key: str) -> Any:
    """The type of the dotted field ``key`` of a nested schema, or ConfigError naming the closest known key."""
    model = schema
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            here = ".".join(parts[:i])
            known = [f"{here}.{name}" if here else name for name in fields]
            hint = did_you_mean(key, leaf_keys(schema))
            raise ConfigError([f"--set {key}: unknown config key; {hint}known keys here: {', '.join(known)}"])
        annotation = fields[part].annotation
        if i == len(parts) - 1:
            return annotation
        if not _is_section(annotation):
            raise ConfigError([f"--set {key}: {'.'.join(parts[: i + 1])} is a value, not a section"])
        model = annotation
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------------------
# values


def _members(annotation: Any) -> tuple[Any, ...]:
    """The alternatives of ``A | B | None`` (or the annotation itself)."""
    if get_origin(annotation) in (Union, types.UnionType):
        return get_args(annotation)
    return (annotation,)


def _allows_none(annotation: Any) -> bool:
    return type(None) in _members(annotation)


def _is_sequence(annotation: Any) -> bool:
    return any(get_origin(m) in (list, tuple, set, frozenset) or m in (list, tuple) for m in _members(annotation))


def _fixed_length(annotation: Any) -> int | None:
    """N for ``tuple[X, Y]``-like fields (N items exactly), None for any other type."""
    for member in _members(annotation):
        args = get_args(member)
        if get_origin(member) is tuple and args and Ellipsis not in args:
            return len(args)
    return None


def _describe(annotation: Any) -> str:
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    return text.replace("typing.", "").replace("NoneType", "None")


def _readings(text: str, annotation: Any) -> list[Any]:
    """The ways ``text`` may be meant for a field of this type, most literal first."""
    readings: list[Any] = []
    if _is_sequence(annotation):
        if text.startswith("[") and text.endswith("]"):
            with contextlib.suppress(json.JSONDecodeError):
                readings.append(json.loads(text))
            text = text[1:-1]
        # Bare words work too ([cifar10, pets]); each item is then typed by the field.
        readings.append([part.strip() for part in text.split(",") if part.strip()])
        return readings
    readings.append(text)
    with contextlib.suppress(json.JSONDecodeError):
        readings.append(json.loads(text))
    return readings


def read_value(key: str, raw: str, annotation: Any) -> Any:
    """The text of ``--set key=raw`` as a value of the field's type; ConfigError naming the key if it is none."""
    text = raw.strip()
    if text.lower() in ("null", "none") and _allows_none(annotation):
        return None
    if _is_section(annotation):
        keys = ", ".join(annotation.model_fields)
        raise ConfigError(
            [
                f"--set {key}={raw}: {key} is a section ({annotation.__name__}), not a value: set its keys ({keys}) "
                f"one at a time, e.g. --set {key}.{next(iter(annotation.model_fields))}=..."
            ]
        )
    adapter = TypeAdapter(annotation)
    readings = _readings(text, annotation)
    first: pydantic.ValidationError | None = None
    for reading in readings:
        try:
            value = adapter.validate_python(reading)
        except pydantic.ValidationError as exc:
            first = first or exc
            continue
        # Trees of settings hold lists (as JSON does); the model turns them back into tuples where it wants them.
        return list(value) if isinstance(value, tuple | set | frozenset) else value
    reason = first.errors()[0]["msg"] if first else "not a value of this type"
    arity = _fixed_length(annotation)
    if arity is not None and len(readings[-1]) != arity:
        reason = f"give {arity} values, as a,b or [a,b], not {len(readings[-1])}"
    raise ConfigError([f"--set {key}={raw}: {reason} (the field's type is {_describe(annotation)})"])


def parse_override(text: str, schema: type[BaseModel]) -> tuple[str, Any]:
    """``"train.steps=100"`` -> ``("train.steps", 100)``, typed by ``schema``'s field; ConfigError names bad ones."""
    key, raw = split_override(text, example="train.steps=100")
    return key, read_value(key, raw, field_annotation(schema, key))


def apply_overrides(tree: dict[str, Any], overrides: Sequence[str], schema: type[BaseModel]) -> dict[str, Any]:
    """``key=value`` strings applied to a copy of a nested settings tree, each typed by ``schema``'s field.

    Every bad override is reported at once.
    """
    tree = json.loads(json.dumps(tree))
    problems = []
    for text in overrides:
        try:
            key, value = parse_override(text, schema)
        except ConfigError as exc:
            problems += exc.problems
            continue
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    if problems:
        raise ConfigError(problems)
    return tree


# ---------------------------------------------------------------------------------------------------------
# validation errors -> messages that name the field and say what to do


def format_errors(
    exc: pydantic.ValidationError,
    *,
    prefix: str = "",
    missing: Mapping[str, str] | None = None,
    known_keys: Iterable[str] = (),
) -> list[str]:
    """One ``"<field>: <what is wrong and what to do>"`` line per problem.

    ``prefix`` is prepended to every field (``recipe.``); ``missing`` gives the message of a required field left
    unset (by dotted name); ``known_keys`` lets an unknown key be answered with the closest known one.
    """
    problems = []
    known_keys = list(known_keys)
    for err in exc.errors():
        # Validator and literal frames, and the union-member suffixes ("model.representation_size.int"), are
        # pydantic's bookkeeping, not part of the field's name.
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "literal[")))
        loc = re.sub(r"\.(int|str|float|bool|none|tuple\[.*\])$", "", loc)
        # Model-level checks have no location: their messages already name the fields.
        loc = prefix + loc if loc else ""
        msg = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ").removeprefix(f"{loc}: ")
        if err["type"] == "missing":
            msg = (missing or {}).get(loc) or f"required: set it with --set {loc}=<value>"
        elif err["type"] == "extra_forbidden":
            msg = f"unknown key: {did_you_mean(loc, known_keys)}remove it or fix the spelling"
        for line in msg.split("\n"):
            problems.append(f"{loc}: {line}" if loc else line)
    return problems


def validate(
    schema: type[Model], tree: Mapping[str, Any], *, missing: Mapping[str, str] | None = None, prefix: str = ""
) -> Model:
    """``schema`` validated from ``tree``, or ConfigError with every problem, each naming its field."""
    try:
        return schema.model_validate(tree)
    except pydantic.ValidationError as exc:
        keys = leaf_keys(schema, prefix)
        raise ConfigError(format_errors(exc, prefix=prefix, missing=missing, known_keys=keys)) from None
