"""Training methods. `get_recipe(method)` maps the config's `method` to a `Recipe` class, importing it lazily so that
loading a config never imports torch models it does not use."""
from __future__ import annotations

import importlib

from sslpipe.recipes.base import Recipe

KNOWN_RECIPES: dict[str, str] = {
    "dino": "sslpipe.recipes.dino:DINORecipe",
    "ibot": "sslpipe.recipes.ibot:IBOTRecipe",
    "dinov2": "sslpipe.recipes.dinov2:DINOv2Recipe",
    "finetune_mask2former": "sslpipe.recipes.finetune_m2f:Mask2FormerRecipe",
    "finetune_vitdet": "sslpipe.recipes.finetune_vitdet:ViTDetRecipe",
    "simclr": "sslpipe.recipes.simclr:SimCLRRecipe",
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
