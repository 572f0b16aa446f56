"""Reading the registry file: YAML with every key's line kept, so that a wrong file is refused at
start-up with the field, its line, the reason and, for an unknown key, the nearest known one."""

from __future__ import annotations

import difflib
import io
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from wattgate.proxy.settings import ConfigError, Settings


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that remembers the line of every mapping key and sequence item."""


def _construct_with_lines(loader: _LineLoader, node: yaml.Node, path: tuple[Any, ...], lines: dict) -> Any:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            out[key] = _construct_with_lines(loader, value_node, path + (key,), lines)
            lines[path + (key,)] = key_node.start_mark.line + 1  # the key's line, not its value's
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct_with_lines(loader, item, path + (i,), lines) for i, item in enumerate(node.value)]
    return loader.construct_object(node, deep=True)


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """The keys the registry allows beside the last key of ``loc`` (for "did you mean")."""
    model: type[BaseModel] = Settings
    i = 0
    while i < len(loc) - 1:
        field = model.model_fields.get(str(loc[i]))
        if field is None:
            return []
        kind, i = field.annotation, i + 1
        if typing.get_origin(kind) is dict:  # models: {name: Model}: the name is the next key
            kind, i = typing.get_args(kind)[1], i + 1
        elif typing.get_origin(kind) in (typing.Union, types.UnionType):
            kind = next((a for a in typing.get_args(kind) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if not (isinstance(kind, type) and issubclass(kind, BaseModel)):
            return []
        model = kind
    return list(model.model_fields)


def parse_settings(text: str, source: str = "<registry>") -> Settings:
    """Parse registry YAML; raise :class:`ConfigError` with line numbers."""
    lines: dict[tuple[Any, ...], int] = {}
    stream = io.StringIO(text)
    stream.name = source  # type: ignore[misc]  # PyYAML names the file in its errors by this
    try:
        loader = _LineLoader(stream)
        try:
            node = loader.get_single_node()
            data = _construct_with_lines(loader, node, (), lines) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the registry must be a mapping with a 'models' key")
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            line = next((lines[loc[:i]] for i in range(len(loc), -1, -1) if loc[:i] in lines), None)
            field = ".".join(str(p) for p in loc) or "(top level)"
            where = f"line {line}" if line else "?"
            hint = ""
            if err["type"] == "extra_forbidden" and (close := difflib.get_close_matches(str(loc[-1]), _fields_at(loc))):
                hint = f" (did you mean '{close[0]}'?)"
            problems.append(f"{source}:{where}: {field}: {err['msg']}{hint}")
        raise ConfigError("invalid registry\n  " + "\n  ".join(problems)) from None


def load_settings(path: str | os.PathLike[str]) -> Settings:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read registry {p}: {exc.strerror}") from None
    return parse_settings(text, str(p))
