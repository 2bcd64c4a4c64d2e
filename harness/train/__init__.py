"""Training the zoo's models: recipes as data, a resumable loop, interval bounds for certified training."""

from .loop import TrainingDiverged, TrainingStep, certified_accuracy, train
from .recipes import RECIPES, Objective, Recipe, recipe, register_recipe

__all__ = ["RECIPES", "Objective", "Recipe", "TrainingDiverged", "TrainingStep", "certified_accuracy", "recipe", "register_recipe", "train"]
