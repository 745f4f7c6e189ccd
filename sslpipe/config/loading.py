"""Recipe YAML in, a validated run config out: reading, `key.sub=value` overrides typed by the schema, the keys a
method does not read, and errors that name the file, the dotted key and the fix.

The schema is given by the caller (`sslpipe.recipes.load_config` picks the method's); nothing here knows a method.
"""
from __future__ import annotations

import difflib
import re
import sys
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ValidationError

from sslpipe.config.core import SAVED_READ, RunConfig, SavedRead
from sslpipe.files import write_text_atomic


class ConfigError(ValueError):
    """A recipe YAML or an override that cannot be turned into a valid config; the message says what to fix."""


class YAML12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats: YAML 1.1 needs a dot, so `1e-5` would stay a string and reach
    free-form keys (`model.kwargs`) as text. Sexagesimal and `_`-separated floats (1.1 only) are read as text.
    A key written twice in one mapping is an error (YAML 1.2 requires unique keys; PyYAML would keep the last one
    without a word, so a second `optim:` block pasted at the end would drop every key of the first)."""

    def construct_document(self, node: yaml.Node) -> Any:
        _refuse_repeated_keys(self, node, (), set())
        return super().construct_document(node)


_MERGE = "tag:yaml.org,2002:merge"


def _refuse_repeated_keys(loader: yaml.SafeLoader, node: yaml.Node, path: tuple, seen: set[int]) -> None:
    """Raise a `ConstructorError` (its mark: the second key) naming a key that appears twice in one mapping, with
    its dotted path and both places. Keys merged in by `<<: *anchor` may be overridden, as YAML intends."""
    if id(node) in seen:  # an alias of a node already checked
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_repeated_keys(loader, item, (*path, i), seen)
    if not isinstance(node, yaml.MappingNode):
        return
    first: dict[Any, yaml.Mark] = {}
    for key_node, value_node in node.value:
        if key_node.tag == _MERGE:
            _refuse_repeated_keys(loader, value_node, path, seen)
            continue
        key = loader.construct_object(key_node) if isinstance(key_node, yaml.ScalarNode) else object()
        mark = key_node.start_mark
        if key in first:
            a, b = first[key], mark
            where = (f"line {a.line + 1}, columns {a.column + 1} and {b.column + 1}" if a.line == b.line
                     else f"lines {a.line + 1} and {b.line + 1}")
            dotted = ".".join(str(k) for k in (*path, key))
            raise yaml.constructor.ConstructorError(None, None, f"key '{dotted}' appears twice ({where}): keep one",
                                                    mark)
        first[key] = mark
        _refuse_repeated_keys(loader, value_node, (*path, key), seen)


def yaml_problem(exc: yaml.YAMLError, one_line_text: bool = False) -> tuple[str, str]:
    """(where, what) of a YAML error, each one line: `line L, column C` (the column alone for a one-line text; ""
    when PyYAML gives no place) and the problem, not PyYAML's several lines of context."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
    if mark is None:
        return "", problem
    at = f"column {mark.column + 1}" if one_line_text else f"line {mark.line + 1}, column {mark.column + 1}"
    return at, problem


_FLOAT = "tag:yaml.org,2002:float"
YAML12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _FLOAT]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
YAML12Loader.add_implicit_resolver(  # after the int resolver, which keeps `12` an int
    _FLOAT, re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+\.[0-9]*|[0-9]+(?=[eE]))(?:[eE][-+]?[0-9]+)?"
                       r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """YAML text as Python values, with YAML 1.2's floats and unique keys (`YAML12Loader`)."""
    return yaml.load(text, Loader=YAML12Loader)


class YAML12Dumper(yaml.SafeDumper):
    """PyYAML's safe dumper resolving plain scalars as `YAML12Loader` reads them, so that a string it would read as
    a number (`run_name: 1e5`) is written quoted and a saved config.yaml loads back to the same config."""


YAML12Dumper.yaml_implicit_resolvers = {k: list(v) for k, v in YAML12Loader.yaml_implicit_resolvers.items()}


def dump_yaml(data: Any) -> str:
    """`data` as YAML text that `load_yaml` reads back to `data` (keys in their order)."""
    return yaml.dump(data, Dumper=YAML12Dumper, sort_keys=False)


# --------------------------------------------------------------------------------------------------------- schema
def _section_at(schema: type[BaseModel], keys: tuple) -> type[BaseModel] | None:
    """The section model holding the last of `keys`, or None when the path leaves the schema (e.g. model.kwargs)."""
    model = schema
    for key in keys[:-1]:
        field = model.model_fields.get(str(key))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model


def _annotation_at(schema: type[BaseModel], keys: Iterable[str]) -> Any:
    model, annotation = schema, None
    for key in keys:
        field = model.model_fields.get(key)
        if field is None:
            return None
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
    return annotation


def _type_name(annotation: Any) -> str:
    text = str(annotation) if typing.get_origin(annotation) else getattr(annotation, "__name__", str(annotation))
    return text.replace("typing.", "")


def unknown_key_message(schema: type[BaseModel], loc: tuple, where: str, hints: Mapping[str, str]) -> str:
    """One line for a key the schema lacks: what it is when the caller knows (`hints`, e.g. another method's
    section), else the closest valid spelling and the valid keys of its section."""
    dotted = ".".join(str(k) for k in loc)
    if dotted in hints:
        return f"{where}: key '{dotted}' {hints[dotted]}"
    model = _section_at(schema, loc)
    valid = list(model.model_fields) if model else []
    close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
    parent = ".".join(str(k) for k in loc[:-1])
    hint = f" Did you mean '{(parent + '.') if parent else ''}{close[0]}'?" if close else ""
    return f"{where}: unknown key '{dotted}'.{hint} Valid keys{(' of ' + parent) if parent else ''}: {', '.join(valid)}"


def _value_at(data: Any, loc: tuple) -> Any:
    for key in loc:
        data = data.get(key) if isinstance(data, dict) else None
    return data


def _is_section(schema: type[BaseModel], loc: tuple) -> bool:
    annotation = _annotation_at(schema, [str(k) for k in loc])
    return not loc or (isinstance(annotation, type) and issubclass(annotation, BaseModel))


def blame(loc: tuple, where: str, origins: Mapping[str, str], message: str | None = None) -> str:
    """Who to name for an error at `loc`: the override that set that key or a value holding it, else `where`. With
    `message` (a section's check, which may involve keys from both), `where` plus the overrides the message names."""
    dotted = ".".join(str(k) for k in loc)
    for key, item in origins.items():
        if dotted == key or dotted.startswith(key + "."):
            return f"override '{item}'"
    if message is None:
        return where
    named = [f"'{item}'" for key, item in origins.items() if re.search(rf"(?<![\w.]){re.escape(key)}(?!\w)", message)]
    return f"{where} with override{'s' if len(named) > 1 else ''} {', '.join(named)}" if named else where


def _format_validation_error(err: ValidationError, data: dict[str, Any], schema: type[BaseModel], where: str,
                             hints: Mapping[str, str], origins: Mapping[str, str]) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        if any(isinstance(k, int) for k in loc):  # an element of a list/tuple: report the whole value
            loc = loc[: next(i for i, k in enumerate(loc) if isinstance(k, int))]
            e = {**e, "type": "element", "input": _value_at(data, loc)}
        dotted = ".".join(str(k) for k in loc)
        msg = e["msg"].removeprefix("Value error, ")
        check = e["type"] == "value_error" and _is_section(schema, loc)  # a section's (or the run's) validator
        at = blame(loc, where, origins, msg if check else None)
        value = list(e["input"]) if isinstance(e.get("input"), tuple) else e.get("input")
        if e["type"] == "extra_forbidden":
            lines.append(unknown_key_message(schema, loc, at, hints))
        elif e["type"] == "missing":
            lines.append(f"{at}: required key '{dotted}' is missing")
        elif check:
            lines.append(f"{at}: {msg}")
        elif e["type"] == "value_error":
            lines.append(f"{at}: key '{dotted}' = {value!r} is invalid: {msg}")
        else:
            expected = _type_name(_annotation_at(schema, [k for k in loc if isinstance(k, str)]))
            lines.append(f"{at}: key '{dotted}' = {value!r} is invalid: expected {expected} ({e['msg']})")
    return "\n".join(dict.fromkeys(lines))


# ------------------------------------------------------------------------------------------------------ overrides
def _check_override_key(schema: type[BaseModel], keys: list[str], item: str, hints: Mapping[str, str]) -> Any:
    """Raise on a key the schema lacks; return the annotation of the field set, None inside a free-form dict."""
    model: type[BaseModel] = schema
    for i, key in enumerate(keys):
        field = model.model_fields.get(key)
        if field is None:
            raise ConfigError(unknown_key_message(schema, tuple(keys[: i + 1]), f"override '{item}'", hints))
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        elif i < len(keys) - 1 and typing.get_origin(ann) is not dict:
            raise ConfigError(f"override '{item}': '{'.'.join(keys[: i + 1])}' is a value, not a section")
        else:
            return ann if i == len(keys) - 1 else None
    return None


def _accepts_str(annotation: Any) -> bool:
    """True for `str`, a Literal of strings, or a union holding one of them (`str | None`)."""
    arms = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)
    return any(a is str or (typing.get_origin(a) is Literal and all(isinstance(v, str) for v in typing.get_args(a)))
               for a in arms)


def _typed_override(annotation: Any, raw: str, value: Any) -> Any:
    """The YAML value of an override, typed by its field as users type it: a string field keeps the text (YAML
    reads `off`, `no`, `on`, `yes` as booleans and `2024` as a number), and a list field takes one value as a
    one-element list (`tracking.log_with=wandb`)."""
    if annotation is None or value is None:
        return value
    if not isinstance(value, str) and _accepts_str(annotation):
        return raw.strip()
    if typing.get_origin(annotation) is list and not isinstance(value, list):
        return [value]
    return value


def split_override(item: str) -> tuple[list[str], str]:
    """`a.b=value` -> (['a', 'b'], 'value'), or a ConfigError saying the expected form."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key.sub=value (e.g. optim.lr=1e-3)")
    key, raw = item.split("=", 1)
    keys = key.strip().split(".")
    if not all(keys):
        raise ConfigError(f"override '{item}': empty key part in '{key}'")
    return keys, raw


def override_origins(overrides: Iterable[str]) -> dict[str, str]:
    """The dotted key each override sets -> the override as given (the last wins, as when they are applied), so that
    an error names the command line rather than the recipe file."""
    return {".".join(split_override(item)[0]): item for item in overrides}


def apply_overrides(data: dict[str, Any], overrides: Iterable[str], schema: type[BaseModel],
                    hints: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Apply `a.b=value` overrides in place; values are parsed as YAML (`1e-3`, `[0.4,1.0]`, `null`), then typed by
    the schema's field (`_typed_override`)."""
    for item in overrides:
        keys, raw = split_override(item)
        annotation = _check_override_key(schema, keys, item, hints or {})
        try:
            value = load_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            if not _accepts_str(annotation):
                at, problem = yaml_problem(exc, one_line_text="\n" not in raw.strip())
                raise ConfigError(f"override '{item}': value {raw!r} is not valid YAML ({at}{': ' if at else ''}"
                                  f"{problem})") from None
            value = raw.strip()  # a string field takes any text (`run_name=a: b`)
        value = _typed_override(annotation, raw, value)
        node = data
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
    return data


# ------------------------------------------------------------------------------------------------ loading, saving
def read_yaml(path: str | Path) -> dict[str, Any]:
    """A recipe file as a dict; errors name the file (and the line of a YAML syntax error)."""
    path = Path(path)
    if path.is_dir():
        run = (f"; to continue the run there: sslpipe train {path / 'config.yaml'} --resume {path}"
               if (path / "config.yaml").is_file() else "")
        raise ConfigError(f"{path} is a directory, not a recipe: give a recipe YAML (e.g. recipes/demo_*.yaml){run}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (give the path of a recipe YAML, e.g. recipes/demo_*.yaml)")
    try:
        data = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as exc:
        at, problem = yaml_problem(exc)
        raise ConfigError(f"{path}:{' ' + at if at else ''}: invalid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def refuse_unread(data: Mapping[str, Any], unread: Mapping[str, str], method: str, where: str,
                  origins: Mapping[str, str] | None = None) -> None:
    """A key the method does not read is refused, never ignored: `unread` maps dotted core keys to why; `origins`
    (`override_origins`) names an override that set one."""
    for dotted, why in unread.items():
        node: Any = data
        for key in dotted.split("."):
            node = node.get(key, _MISSING) if isinstance(node, Mapping) else _MISSING
        if node is not _MISSING:
            at = blame(tuple(dotted.split(".")), where, origins or {})
            raise ConfigError(f"{at}: key '{dotted}' is not read by method '{method}': {why}. Remove it")


_MISSING = object()


def validate(data: dict[str, Any], schema: type[RunConfig], where: str, hints: Mapping[str, str] | None = None,
             origins: Mapping[str, str] | None = None, saved: bool = False) -> RunConfig:
    """Validate a plain dict against `schema`; errors name `where` (or the override, `override_origins`), the
    dotted key and what was expected. `saved`: `data` is a run's own config.yaml, written by an earlier sslpipe: a
    value its settings leave unread, which this version refuses, is dropped with a notice (the run was made and the
    key changed nothing in it; one the command line sets is refused as ever)."""
    state = SavedRead(overridden=frozenset(origins or ())) if saved else None
    token = SAVED_READ.set(state)
    try:
        cfg = schema.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, data, schema, where, hints or {}, origins or {})) from None
    finally:
        SAVED_READ.reset(token)
    if state is not None and state.dropped:
        print(f"{where}: written by an earlier sslpipe; dropped what this run's settings never read: "
              f"{'; '.join(state.dropped)}", file=sys.stderr)
    return cfg


def is_run_config(path: str | Path) -> bool:
    """Whether `path` is a run directory's own config.yaml (beside its checkpoints or metrics), not a recipe."""
    path = Path(path)
    return path.name == "config.yaml" and ((path.parent / "checkpoints").is_dir()
                                           or (path.parent / "metrics.jsonl").is_file())


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain YAML/JSON-friendly dict (tuples become lists), without the core keys the method does not read (so the
    saved file loads back under the same refusal)."""
    data = cfg.model_dump(mode="json")
    for dotted in type(cfg).unread:
        *parents, last = dotted.split(".")
        node = data
        for key in parents:
            node = node.get(key, {})
        node.pop(last, None)
    return data


def save_config(cfg: RunConfig, path: str | Path, header: str | None = None) -> Path:
    """Write the resolved config as YAML (what the loader reads back to the same config); `header` becomes comment
    lines on top (the command-line overrides), every line of it commented: an override may hold a newline. Written
    atomically: a resume rewrites the run's only copy, which a full disk part-way must leave whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = dump_yaml(config_to_dict(cfg))
    write_text_atomic(path, "".join(f"# {line}\n" for line in (header or "").splitlines()) + text)
    return path
