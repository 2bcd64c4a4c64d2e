"""Where and with what a result was computed: the device, the code's commit, the package versions.

Every room that stores a result (the run's cells, the training records) reads
these from here, so none of them imports another for them.
"""

from __future__ import annotations

import functools
import importlib.metadata
import subprocess
from pathlib import Path

import torch

__all__ = ["git_commit", "package_versions", "resolve_device"]

DISTRIBUTION = "wasserstein-robustness-bench"
"""This project's distribution name (``pyproject.toml``)."""

_PACKAGES = ("torch", "torchvision", "numpy", "scipy", "pyarrow", "pandas", "ray", "hydra-core")


def resolve_device(name: str) -> torch.device:
    """The device a setting names (``auto``: CUDA when available, else CPU)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@functools.cache
def package_versions() -> dict[str, str]:
    """The installed versions of the packages a result depends on (read once per process: they do not change)."""
    versions = {}
    for package in _PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def git_commit() -> str:
    """The commit of the checkout the code runs from; for an installed package, its distribution and version.

    The code counts as a checkout's only where git tracks this very file, so
    a package installed into a virtual environment inside a checkout is not
    taken for the checkout's code.
    """
    here = Path(__file__).resolve()
    tracked = _git("ls-files", "--error-unmatch", here.name, cwd=here.parent)
    commit = _git("rev-parse", "HEAD", cwd=here.parent) if tracked is not None else None
    if commit:
        return commit
    try:
        version = importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
    return f"{DISTRIBUTION} {version} (installed, not a git checkout)"


def _git(*arguments: str, cwd: Path) -> str | None:
    """Git's output, stripped; None where git is missing or fails."""
    try:
        result = subprocess.run(["git", *arguments], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None
