"""What to compute: the recipe (models, weights, key policies) and the chunk methods."""

from .spec import KeyPolicy, MergeRecipe

__all__ = ["KeyPolicy", "MergeRecipe"]
