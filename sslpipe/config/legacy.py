"""Reading a config written before the per-method schema (sslpipe 0.1: one schema with every method's sections), so
that a run directory of that version still resumes and its exports and evaluations still load.

Keys move to their new homes (`head` -> `<method>.head`, `optim.momentum_teacher` -> `<method>.momentum_teacher`,
`finetune.eval_mode` -> `eval.mode`, ...). A key the run's method does not read was saved with every run at its
default: it is dropped when it still holds that default, and refused, naming it, when it does not (a value that was
never used is not silently carried over). The teacher's momentum and last-layer freeze are dropped for a method
without a teacher, whatever their value: 0.1 read them, to no effect.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

# The 0.1 sections of one method, or of a family of methods, and who owns them now.
OWNED_SECTIONS = {"simclr": ("simclr",), "finetune": ("finetune_mask2former", "finetune_vitdet"),
                  "u2pl": ("u2pl", "supervised_seg"), "dinov2": ("dinov2",)}
# 0.1 sections that moved inside the section of each method that reads them
NESTED_SECTIONS = ("head", "loss", "masking", "qscore")
# single keys that moved: old -> (new, where {m} is the method's section, or None: gone; the 0.1 default)
RENAMED: dict[str, tuple[str | None, Any]] = {
    "qscore.eta": (None, 1e-3),  # never read in training (`sslpipe qscore --eta` sets the report's)
    "eval.knn_every_epochs": ("eval.every_epochs", 0),
    "eval.knn_max_train": ("eval.max_train", None),
    "eval.knn_max_val": ("eval.max_val", None),
    "optim.momentum_teacher": ("{m}.momentum_teacher", 0.996),
    "optim.momentum_teacher_end": ("{m}.momentum_teacher_end", 1.0),
    "optim.freeze_last_layer_epochs": ("{m}.freeze_last_layer_epochs", 1),
    "finetune.backbone": ("model.init_from", None),
    "finetune.eval_size": ("eval.resize", None),
    "finetune.eval_mode": ("eval.mode", "slide"),
    "finetune.eval_max_images": ("eval.max_val", None),
    "finetune.eval_batch_size": ("eval.batch_size", 8),
    "finetune.predict_images": ("eval.predict_images", 6),
    "u2pl.eval_mode": ("eval.mode", "whole"),
    "u2pl.eval_crop": ("eval.window", None),
    "u2pl.eval_stride_rate": ("eval.stride_rate", 2 / 3),
    "u2pl.eval_batch_size": ("eval.batch_size", 8),
    "u2pl.eval_max_images": ("eval.max_val", None),
}


def is_legacy(data: Mapping[str, Any], schema: type[BaseModel], method_key: str | None) -> bool:
    """True for a 0.1 layout: a section or key only 0.1 had, in a file without a section of its method that 0.1
    did not have. A section of another method today (`u2pl:` in a DINO recipe) is no sign: it is refused as such,
    and a teacher's key is one only for a method with a teacher."""
    if method_key in data and method_key not in OWNED_SECTIONS:
        return False
    if any(key in data and key not in schema.model_fields for key in NESTED_SECTIONS):
        return True
    if any(key in data and key not in owners for key, owners in OWNED_SECTIONS.items()):  # `finetune:`
        return True
    return any(_get(data, old.split(".")) is not _MISSING and not _in_schema(schema, old.split("."))
               and (new is None or _in_schema(schema, new.format(m=method_key).split(".")))
               for old, (new, _) in RENAMED.items())


def moved_hints(schema: type[BaseModel], method_key: str | None) -> dict[str, str]:
    """Where each moved 0.1 key is now, for the refusal of one in a file of today's layout."""
    hints = {key: f"is a section of sslpipe 0.1: it is '{method_key}.{key}' now"
             for key in NESTED_SECTIONS if _in_schema(schema, [str(method_key), key])}
    for old, (new, _) in RENAMED.items():
        target = (new or "").format(m=method_key)
        if new and _in_schema(schema, target.split(".")):
            hints[old] = f"is a key of sslpipe 0.1: it is '{target}' now"
    return hints


_MISSING = object()


def _get(data: Any, keys: list[str]) -> Any:
    for key in keys:
        if not isinstance(data, Mapping) or key not in data:
            return _MISSING
        data = data[key]
    return data


def _field(schema: type[BaseModel], keys: list[str]) -> Any:
    """The pydantic field at a dotted path, or None."""
    model, field = schema, None
    for i, key in enumerate(keys):
        if model is None:
            return None
        field = model.model_fields.get(key)
        if field is None:
            return None
        ann = field.annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if model is None and i < len(keys) - 1:
            return None
    return field


def _in_schema(schema: type[BaseModel], keys: list[str]) -> bool:
    return _field(schema, keys) is not None


def _leaves(data: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[list[str], Any]]:
    out = []
    for key, value in data.items():
        path = (*prefix, str(key))
        if isinstance(value, Mapping) and value and path != ("model", "kwargs"):
            out += _leaves(value, path)
        else:
            out.append((list(path), value))
    return out


def _same(a: Any, b: Any) -> bool:
    """Equal values, a tuple default and its YAML list alike."""
    return (list(a) if isinstance(a, tuple) else a) == (list(b) if isinstance(b, tuple) else b)


def _default(keys: list[str], schema: type[BaseModel], sections: Mapping[str, type[BaseModel]]) -> Any:
    """The 0.1 default of an old key: from the renames; for a 0.1 method section, the same key in its owners'
    sections today; else the same key in the core or in any method's section (moved sections kept their defaults)."""
    dotted = ".".join(keys)
    if dotted in RENAMED:
        return RENAMED[dotted][1]
    if keys[0] in OWNED_SECTIONS:
        owners, path = [sections[k] for k in OWNED_SECTIONS[keys[0]] if k in sections], keys[1:]
    else:
        owners, path = [schema, *sections.values()], keys
    for owner in owners:
        field = _field(owner, path)
        if field is not None and not field.is_required():
            return field.get_default(call_default_factory=True)
    return _MISSING


def migrate(data: dict[str, Any], method_key: str, schema: type[BaseModel],
            sections: Mapping[str, type[BaseModel]], where: str) -> tuple[dict[str, Any], list[str]]:
    """(the data in today's layout, one note per moved key). Raises ValueError naming a key whose value the method
    never read."""
    from sslpipe.config.loading import ConfigError

    unread = getattr(schema, "unread", {})
    out: dict[str, Any] = {}
    notes: list[str] = []
    for keys, value in _leaves(data):
        dotted = ".".join(keys)
        owned = keys[0] in OWNED_SECTIONS and method_key in OWNED_SECTIONS[keys[0]]
        if dotted in RENAMED and (keys[0] not in OWNED_SECTIONS or owned):
            new = (RENAMED[dotted][0] or "-").format(m=method_key).split(".")
        elif keys[0] in NESTED_SECTIONS:
            new = [method_key, *keys]
        elif owned:
            new = [method_key, *keys[1:]]
        else:
            new = keys
        new_dotted = ".".join(new)
        if _in_schema(schema, new) and new_dotted not in unread:
            node = out
            for key in new[:-1]:
                node = node.setdefault(key, {})
            if new[-1] in node and not _same(node[new[-1]], value):
                raise ConfigError(f"{where}: written by sslpipe 0.1, and two of its keys set '{new_dotted}' (now "
                                  f"{node[new[-1]]!r}, then '{dotted}' = {value!r}): keep one and load the file again")
            node[new[-1]] = value
            if new != keys:
                notes.append(f"{dotted} -> {new_dotted}")
            continue
        if dotted in RENAMED and "{m}" in (RENAMED[dotted][0] or ""):
            notes.append(f"{dotted} dropped (it acted on a teacher this method does not have)")
            continue
        default = _default(keys, schema, sections)
        if default is _MISSING or not _same(value, default):
            raise ConfigError(f"{where}: written by sslpipe 0.1, and its key '{dotted}' = {value!r} is not read by "
                              f"method '{data.get('method')}' in this version: remove it and load the file again")
    return out, notes
