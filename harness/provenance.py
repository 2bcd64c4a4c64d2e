"""Where and with what a result was computed: the device, the code's commit, the package versions.

Every room that stores a result (the run's cells, the training records) reads
these from here, so none of them imports another for them.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
from pathlib import Path

import torch

__all__ = ["git_commit", "package_versions", "resolve_device"]

_PACKAGES = ("torch", "torchvision", "numpy", "scipy", "pyarrow", "pandas", "ray", "hydra-core")


def resolve_device(name: str) -> torch.device:
    """The device a setting names (``auto``: CUDA when available, else CPU)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def package_versions() -> dict[str, str]:
    versions = {}
    for package in _PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def git_commit() -> str:
    """The commit of the checkout the code runs from ('unknown' outside git)."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown"
