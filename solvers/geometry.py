"""Geometry of the local-transport Wasserstein ball.

An image ``x`` of shape ``(C, H, W)`` with non-negative entries is a mass
distribution. Its Wasserstein ball of radius ``eps`` is

.. math::

    \\mathcal{B}(x, \\epsilon) = \\{ z = \\Pi^\\top \\mathbf{1} :
        \\Pi \\ge 0,\\; \\Pi \\mathbf{1} = x,\\;
        \\langle \\Pi, C \\rangle \\le \\epsilon \\, m(x) \\},

where ``m(x)`` is the total mass of ``x`` over all channels and the plan
``Pi`` is *local*: mass at a pixel moves only inside the ``k x k`` window
centred on it, within its own channel. Moving one unit of mass by the pixel
offset ``(dr, ds)`` costs ``(dr^2 + ds^2)^(p/2)``. Radii are therefore in
*normalized units*: ``eps = 0.1`` moves 10% of the image's mass by one pixel.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LocalTransport:
    """The cost structure of local transport with a ``k x k`` window.

    Parameters
    ----------
    kernel_size : int
        Window side ``k``; an odd integer >= 3.
    p : float
        Exponent of the Euclidean pixel distance in the cost, ``p > 0``.
        ``p = 1`` is the 1-Wasserstein distance of the paper's text; ``p = 2``
        (squared distance) is the default of the paper's code.
    """

    kernel_size: int = 5
    p: float = 2.0

    def __post_init__(self) -> None:
        k = self.kernel_size
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 3 or k % 2 == 0:
            raise ValueError(f"kernel_size={k!r} is invalid: it must be an odd integer >= 3")
        if isinstance(self.p, bool) or not isinstance(self.p, numbers.Real) or not math.isfinite(self.p) or self.p <= 0:
            raise ValueError(f"p={self.p!r} is invalid: it must be a finite number > 0")

    @property
    def radius(self) -> int:
        """Largest pixel offset along one axis, ``k // 2``."""
        return self.kernel_size // 2

    def cost(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
        """Cost of each window offset, a ``(k, k)`` tensor with zero at the centre."""
        offsets = torch.arange(-self.radius, self.radius + 1, dtype=torch.float64)
        squared = offsets[:, None] ** 2 + offsets[None, :] ** 2
        return squared.pow(self.p / 2).to(dtype=dtype, device=device)

    @property
    def max_cost(self) -> float:
        """Cost of the window's corner offset, the largest single move."""
        return (2 * self.radius**2) ** (self.p / 2)


def check_nonnegative_eps(eps, batch_size: int, like: torch.Tensor) -> torch.Tensor:
    """Return ``eps`` as a ``(B,)`` tensor, rejecting negative or non-finite radii.

    Parameters
    ----------
    eps : float or Tensor
        One radius for the whole batch or one per example (shape ``(B,)``).
    batch_size : int
        ``B``.
    like : Tensor
        Supplies dtype and device.
    """
    eps_tensor = torch.as_tensor(eps, dtype=like.dtype, device=like.device)
    if eps_tensor.dim() == 0:
        eps_tensor = eps_tensor.expand(batch_size)
    if eps_tensor.shape != (batch_size,):
        raise ValueError(
            f"eps has shape {tuple(eps_tensor.shape)}: it must be a float or a tensor of shape ({batch_size},)"
        )
    bad = ~torch.isfinite(eps_tensor) | (eps_tensor < 0)
    if bool(bad.any()):
        index = int(bad.nonzero()[0])
        raise ValueError(f"eps={float(eps_tensor[index])} (example {index}) is invalid: radii must be finite and >= 0")
    return eps_tensor.clone()


def check_images(x: torch.Tensor, w: torch.Tensor, *, w_name: str = "w") -> None:
    """Validate a batch of centres ``x`` and targets ``w`` of shape ``(B, C, H, W)``."""
    for name, tensor in (("x", x), (w_name, w)):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of shape (B, C, H, W), got {type(tensor).__name__}")
        if tensor.dim() != 4:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}: it must have 4 dimensions (B, C, H, W)")
        if tensor.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"{name} has dtype {tensor.dtype}: allowed dtypes are torch.float32 and torch.float64")
    if x.shape != w.shape:
        raise ValueError(f"shape mismatch: x has shape {tuple(x.shape)} but {w_name} has {tuple(w.shape)}; they must be equal")
    if x.dtype != w.dtype or x.device != w.device:
        raise ValueError(
            f"x ({x.dtype}, {x.device}) and {w_name} ({w.dtype}, {w.device}) must share dtype and device"
        )
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x has NaN or infinite entries: centres must be finite images")
    if bool((x < 0).any()):
        raise ValueError(f"x has negative entries (min {float(x.min()):.3g}): a centre image is mass and must be >= 0")
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{w_name} has NaN or infinite entries")
