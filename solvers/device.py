"""How often a solver's loop may read a value back on the host."""

from __future__ import annotations

import torch

__all__ = ["sync_interval"]


def sync_interval(device: torch.device | str) -> int:
    """Iterations between stopping tests that read a value on the host.

    On the CPU a test is free; on a GPU each one stalls the queue of
    kernels, so loops run a few masked iterations between tests instead.
    """
    return 1 if torch.device(device).type == "cpu" else 4
