"""The catalogue: registered solvers and models, looked up by name."""

from .architectures import Binarize, ClassifierWithPreprocessing, Normalize
from .model_registry import (
    BUILTIN_MODELS,
    WEIGHTS_ENV_VAR,
    Dataset,
    GradientMode,
    ModelRegistry,
    ModelSpec,
    TrainedFor,
    WeightsFile,
    model,
    models,
    register_model,
    resolve_weights_dir,
    weights_path,
)
from .solvers import (
    BUILTIN_SOLVERS,
    SolverKind,
    SolverRegistry,
    SolverSpec,
    register_solver,
    solver,
    solver_specs,
)

__all__ = [
    "BUILTIN_MODELS",
    "BUILTIN_SOLVERS",
    "WEIGHTS_ENV_VAR",
    "Binarize",
    "ClassifierWithPreprocessing",
    "Dataset",
    "GradientMode",
    "ModelRegistry",
    "ModelSpec",
    "Normalize",
    "SolverKind",
    "SolverRegistry",
    "SolverSpec",
    "TrainedFor",
    "WeightsFile",
    "model",
    "models",
    "register_model",
    "register_solver",
    "resolve_weights_dir",
    "solver",
    "solver_specs",
    "weights_path",
]
