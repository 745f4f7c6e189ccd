"""Training methods, one per module, each with its config section beside it; the registry maps a recipe's
`method` to its class and its schema."""
from sslpipe.recipes.base import Recipe
from sslpipe.recipes.registry import KNOWN_RECIPES, config_from_dict, get_recipe, load_config, schema_for

__all__ = ["KNOWN_RECIPES", "Recipe", "config_from_dict", "get_recipe", "load_config", "schema_for"]
