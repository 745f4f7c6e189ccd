"""The methods sslpipe trains, and the schema of each method's runs: the core plus the method's own section.

`get_recipe(method)` maps the config's `method` to a `Recipe` class, imported only when asked for, so a config
never imports models it does not use. `load_config` reads a recipe YAML under its method's schema: a key of another
method's section, or a core key the method does not read, is refused with one line that names the method.
"""
from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sslpipe.config import ConfigError, RunConfig, legacy, run_schema
from sslpipe.config.loading import (
    apply_overrides,
    is_run_config,
    override_origins,
    read_yaml,
    refuse_unread,
    split_override,
    unknown_key_message,
    validate,
)
from sslpipe.recipes.base import Recipe

KNOWN_RECIPES: dict[str, str] = {
    "dino": "sslpipe.recipes.dino:DINORecipe",
    "ibot": "sslpipe.recipes.ibot:IBOTRecipe",
    "dinov2": "sslpipe.recipes.dinov2:DINOv2Recipe",
    "dinov3": "sslpipe.recipes.dinov3:DINOv3Recipe",
    "finetune_mask2former": "sslpipe.recipes.finetune_m2f:Mask2FormerRecipe",
    "finetune_vitdet": "sslpipe.recipes.finetune_vitdet:ViTDetRecipe",
    "simclr": "sslpipe.recipes.simclr:SimCLRRecipe",
    "distill": "sslpipe.recipes.distill:DistillRecipe",
    "u2pl": "sslpipe.recipes.u2pl:U2PLRecipe",
    "supervised_seg": "sslpipe.recipes.seg_supervised:SupervisedSegRecipe",
}


def get_recipe(method: str) -> type[Recipe]:
    """`dino`, `ibot`, `dinov2`, ..., or `package.module:ClassName` for a recipe defined outside sslpipe."""
    target = KNOWN_RECIPES.get(method.lower(), method)
    if ":" not in target:
        raise ValueError(
            f"unknown method {method!r} (config key 'method'): known methods are {', '.join(sorted(KNOWN_RECIPES))}, "
            "or give 'package.module:ClassName' for your own Recipe subclass"
        )
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ValueError(f"method {method!r}: cannot import module {module_name!r} ({exc})") from exc
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Recipe)):
        raise ValueError(f"method {method!r}: {module_name}.{class_name} is not a sslpipe.recipes.base.Recipe subclass")
    return cls


@functools.cache
def schema_for(method: str) -> type[RunConfig]:
    """The schema of `method`'s runs (the core, the method's section, its unread core keys), one class per method."""
    cls = get_recipe(method)
    # every built-in method evaluates on data.val; a recipe of your own may evaluate on something else
    return run_schema(cls.config_key, cls.config_section, cls.unread, evaluates_val=method in KNOWN_RECIPES)


def _other_sections(method: str) -> dict[str, str]:
    """What a top-level key that belongs to another built-in method is, for the refusal's one line."""
    key = get_recipe(method).config_key
    return {other: f"is the section of method '{other}', not read by method '{method}'"
            + (f" (its section is '{key}')" if key else "")
            for other in KNOWN_RECIPES if other != key}


def _method_of(data: dict[str, Any], where: str) -> str:
    """The method, a built-in one by its registry key (`DINO` -> `dino`), as the commands compare it exactly."""
    method = data.get("method")
    if not isinstance(method, str) or not method:
        raise ConfigError(f"{where}: required key 'method' is missing (e.g. method: dinov2; known methods: "
                          f"{', '.join(sorted(KNOWN_RECIPES))})")
    return method.lower() if method.lower() in KNOWN_RECIPES else method


def _method_override(item: str, method: str, where: str) -> str:
    """`method=X` picks the schema, so it may only name a recipe that reads the same section (a subclass of the
    recipe's method, `package.module:Class`); another method's schema would refuse the recipe's own section."""
    keys, raw = split_override(item)
    new = _method_of({"method": raw.strip()}, f"override '{item}'")
    try:
        same = len(keys) == 1 and get_recipe(new).config_key == get_recipe(method).config_key
    except ValueError as err:
        raise ConfigError(f"override '{item}': {err}") from None
    if not same:
        raise ConfigError(f"override '{item}': the method cannot be overridden by another method's; choose it in "
                          f"the recipe file ({where}), or use a recipe of that method (recipes/*.yaml)")
    return new


def _holds_a_0_1_section(data: dict[str, Any], schema: type[RunConfig]) -> bool:
    """Whether `data` has a section only sslpipe 0.1 wrote (`head:`, `loss:` at the top, `finetune:` in a run of
    another method): a config.yaml of a 0.1 run, which held every method's keys at their defaults, so what this
    run never read is dropped. One renamed key alone (`eval.knn_every_epochs`) is no such sign: a recipe of today's
    layout with an old key's name, whose unread values are refused as in any recipe."""
    return (any(k in data and k not in schema.model_fields for k in legacy.NESTED_SECTIONS)
            or any(k in data and k not in owners for k, owners in legacy.OWNED_SECTIONS.items()))


def config_from_dict(data: dict[str, Any], where: str = "config", overrides: Iterable[str] = (),
                     saved: bool = False) -> RunConfig:
    """Validate a plain dict (plus overrides) under its method's schema; errors name `where`, or the override, and
    the dotted key. A config written before the per-method schema is read in its new layout (`config.legacy`).
    `saved`: a run's own config.yaml, whose keys this version refuses as unread are dropped with a notice
    (`config.loading.validate`), as in a config.yaml of sslpipe 0.1 (`_holds_a_0_1_section`)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of keys, got {type(data).__name__}")
    overrides = list(overrides)
    method = _method_of(data, where)
    for item in [o for o in overrides if split_override(o)[0][0] == "method"]:
        method = _method_override(item, method, where)
        overrides.remove(item)
    data = {**data, "method": method}
    try:
        schema = schema_for(method)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None
    hints = _other_sections(method)
    key = get_recipe(method).config_key
    if legacy.is_legacy(data, schema, key):
        foreign = sorted(data.keys() & (hints.keys() - legacy.OWNED_SECTIONS.keys()))  # today's, not 0.1's
        if foreign:
            raise ConfigError(unknown_key_message(schema, (foreign[0],), where, hints))
        sections = {cls.config_key: cls.config_section for cls in map(get_recipe, KNOWN_RECIPES)}
        saved = saved or _holds_a_0_1_section(data, schema)
        data, notes = legacy.migrate(data, key, schema, sections, where)
        print(f"{where}: read in the layout before per-method sections; moved {', '.join(notes) or 'nothing'}",
              file=sys.stderr)
    hints = {**hints, **legacy.moved_hints(schema, key)}
    origins = override_origins(overrides)
    apply_overrides(data, overrides, schema, hints)
    refuse_unread(data, schema.unread, method, where, origins)
    return validate(data, schema, where, hints, origins, saved=saved)


def load_config(path: str | Path, overrides: Iterable[str] = (), saved: bool | None = None) -> RunConfig:
    """Read a recipe YAML, apply `key.sub=value` overrides and validate it under its method's schema. `saved`: the
    file is a run's own config.yaml (None: when it lies beside the run's checkpoints or metrics)."""
    return config_from_dict(read_yaml(path), where=str(path), overrides=overrides,
                            saved=is_run_config(path) if saved is None else saved)
