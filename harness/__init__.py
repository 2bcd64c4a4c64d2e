"""The benchmark's harness: the attack and its evaluation, the runs, the report, training.

``harness.evaluate`` (:func:`harness.attack.suite.evaluate`) is the standard
evaluation of any model; it is imported on first use, so that ``import
harness`` stays light.
"""

__all__ = ["evaluate"]


def __getattr__(name: str):
    if name == "evaluate":
        from .attack.suite import evaluate

        return evaluate
    raise AttributeError(f"module 'harness' has no attribute {name!r}")
