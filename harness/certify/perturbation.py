r"""The perturbation both certifiers bound over: the local-transport Wasserstein ball, with or without the box.

For an image :math:`x \ge 0` of mass :math:`m(x)` the ball is the set of
images :math:`x' = P^\top \mathbf 1` of local plans :math:`P \ge 0` with
:math:`P \mathbf 1 = x` and cost :math:`\langle c, P\rangle \le b =
\varepsilon\, m(x)` (:mod:`solvers.plan_space`); with the box also
:math:`x' \le 1`. :class:`WassersteinBall` holds a batch of them and gives
each certifier the form it needs:

* :meth:`~WassersteinBall.concretize`, the *support function*
  :math:`h(a) = \max_{x'} \langle a, x'\rangle`, as sound upper bounds for
  thousands of coefficient images at once (the Lagrangian dual of
  :mod:`solvers.support`: exact without the box, a certified bound with it),
  which is how the linear bounds turn an affine function of the image into a
  number;
* :meth:`~WassersteinBall.pixel_bounds`, every pixel's range, the input box
  of interval bounds;
* :meth:`~WassersteinBall.encode`, the ball as rows of a program (the plan
  entries, their row sums, the budget and, with the box, the capacities),
  the input of the MILP.

The one exact reference for the support function is the HiGHS LP of
:func:`solvers.exact.linear_maximization` (``box=True`` for the box), which
shares no code with any of these.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from solvers.checks import check_iterations
from solvers.geometry import LocalTransport, check_nonnegative_eps
from solvers.plan_space import plan_image, repair_capacity, window_layout
from solvers.support import wasserstein_support

from .program import Program, ProgramValues
from .safety import gamma, unit_roundoff

__all__ = ["BallEncoding", "WassersteinBall"]

SUPPORT_CHUNK = 2048
"""Coefficient images bounded at once (the support function holds about 100 float64 values per pixel and image)."""


@dataclass
class BallEncoding:
    """The plan entries of one image's ball in a program, and the image they transport to.

    Entry ``e`` moves mass from pixel ``source[e]`` (flat over ``C H W``) by
    window offset ``offset[e]`` to pixel ``destination[e]``; ``row[e]``
    numbers its source among the pixels with mass, and ``stay[r]`` is the
    entry of row ``r`` at offset ``(0, 0)``. ``lower`` and ``upper`` are the
    pixels' bounds (:meth:`WassersteinBall.pixel_bounds`), flat.
    """

    x: np.ndarray
    transport: LocalTransport
    box: bool
    budget: float
    row_mass: np.ndarray
    row: np.ndarray
    source: np.ndarray
    offset: np.ndarray
    destination: np.ndarray
    stay: np.ndarray
    cost: np.ndarray
    plan: np.ndarray
    image: ProgramValues
    lower: np.ndarray
    upper: np.ndarray

    def point(self, solution: np.ndarray) -> np.ndarray:
        r"""The image of a solver's plan after moving the plan exactly into the ball, ``(C, H, W)`` float64.

        Solvers meet the rows only to their tolerances. The plan is clipped at 0
        and each row rescaled to :math:`x_i` (an empty row keeps its mass in
        place); a plan over budget is mixed with the identity plan :math:`D`,
        which costs nothing, :math:`P \leftarrow \theta P + (1 - \theta) D`;
        with the box, mass arriving at over-full pixels is sent back to its
        source (:func:`solvers.plan_space.repair_capacity`), which keeps
        the rows and can only lower the cost.
        """
        entries = np.maximum(solution[self.plan], 0.0)
        sent = np.bincount(self.row, weights=entries, minlength=self.row_mass.size)
        empty = sent <= 0
        entries *= np.where(empty, 0.0, self.row_mass / np.where(empty, 1.0, sent))[self.row]
        entries[self.stay[empty]] = self.row_mass[empty]
        spent = float(self.cost @ entries)
        if spent > self.budget:
            theta = self.budget / spent
            entries *= theta
            entries[self.stay] += (1.0 - theta) * self.row_mass
        channels, height, width = self.x.shape
        k2 = self.transport.kernel_size**2
        plan = torch.zeros(channels * height * width, k2, dtype=torch.float64)
        plan[torch.from_numpy(self.source), torch.from_numpy(self.offset)] = torch.from_numpy(entries)
        plan = plan.view(1, channels, height * width, k2)
        x = torch.from_numpy(self.x)[None]
        if self.box:
            _, valid = window_layout(self.transport, height, width, dtype=torch.float64)
            plan, _ = repair_capacity(plan, x, valid)
        return plan_image(plan, height, width)[0].numpy()


class WassersteinBall:
    r"""The balls :math:`\mathcal B_{\varepsilon_b}(x_b)` of a batch (with ``box`` intersected with :math:`x' \le 1`).

    Parameters
    ----------
    x : Tensor (B, C, H, W)
        Centres, ``>= 0`` (with the box also ``<= 1``); kept in float64.
    eps : float or Tensor (B,)
        Radii in normalized units, ``>= 0``.
    transport : LocalTransport
        Window and cost exponent.
    box : bool
        Intersect the ball with :math:`x' \le 1`.
    capacity_rounds : int, default 5
        With the box: price updates of each support-function bound (:mod:`solvers.support`).

    Raises
    ------
    ValueError
        A bad argument (named), negative pixels, or a centre above 1 with the box (that ball is empty).
    """

    def __init__(self, x: torch.Tensor, eps, transport: LocalTransport, box: bool, capacity_rounds: int = 5):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"x must be a (B, C, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}")
        if not isinstance(transport, LocalTransport):
            raise ValueError(f"transport={transport!r} is invalid: it must be a LocalTransport")
        if not isinstance(box, bool):
            raise ValueError(f"box={box!r} is invalid: it must be True or False")
        self.x = x.detach().double()
        if bool((self.x < 0).any()):
            raise ValueError(f"x has negative entries (min {float(self.x.min()):.3g}): an image is mass and must be >= 0")
        if box and bool((self.x > 1).any()):
            raise ValueError(f"box=True needs images with pixels <= 1 (max {float(self.x.max()):.6g}): otherwise the ball is empty")
        self.eps = check_nonnegative_eps(eps, x.shape[0], self.x)
        self.transport, self.box = transport, box
        self.capacity_rounds = check_iterations("capacity_rounds", capacity_rounds)

    def __len__(self) -> int:
        return self.x.shape[0]

    def __repr__(self) -> str:
        return f"WassersteinBall({len(self)} images of shape {tuple(self.x.shape[1:])}, {self.transport}, box={self.box})"

    @property
    def budget(self) -> torch.Tensor:
        r"""Per example the transport budget :math:`b = \varepsilon\, m(x)`, ``(B,)`` float64."""
        return self.eps * self.x.flatten(1).sum(1)

    def without_box(self) -> "WassersteinBall":
        """The same balls without the box: supersets, whose support function needs no capacity prices."""
        return WassersteinBall(self.x, self.eps, self.transport, False, self.capacity_rounds)

    # ----------------------------------------------------------------------
    # The support function
    # ----------------------------------------------------------------------

    def concretize(self, coefficients: torch.Tensor, example: torch.Tensor) -> torch.Tensor:
        r"""Upper bounds on :math:`h(a_s) = \max_{x' \in \mathcal B(x_{e_s})} \langle a_s, x'\rangle`, one per coefficient image.

        Parameters
        ----------
        coefficients : Tensor (S, C, H, W)
            The coefficient images :math:`a_s`, any sign.
        example : Tensor (S,), int64
            The ball :math:`e_s` of each.

        Returns
        -------
        Tensor (S,), float64
            Dual values of :func:`solvers.support.wasserstein_support`: sound
            at any iteration count, exact without the box.
        """
        values = []
        for start in range(0, coefficients.shape[0], SUPPORT_CHUNK):
            stop = start + SUPPORT_CHUNK
            values.append(wasserstein_support(
                coefficients[start:stop], self.x, example[start:stop], self.eps, self.transport,
                box=self.box, capacity_rounds=self.capacity_rounds,
            ).value)
        return torch.cat(values) if values else coefficients.new_zeros(0)

    def support_rounding(self) -> torch.Tensor:
        r"""Per example, a bound on the float64 rounding of :meth:`concretize` for a unit coefficient image.

        Its dual value :math:`\sum_j \nu_j + \langle a', x\rangle + \mu b + \sum_i x_i \max_k (g_{ik} - \mu c_k)`
        has coefficients :math:`a' = a - \nu` with capacity prices :math:`0 \le \nu_j \le 2 k^2 \sqrt{R}` after
        :math:`R` price rounds of step at most :math:`k^2 / \sqrt{r + 1}` (the overflow of a pixel is below the
        mass of its :math:`k \times k` window; no prices without the box), so gains
        :math:`|g_{ik}| \le 1 + 2 k^2 \sqrt{R}`, :math:`\mu` at most that at its minimum (costs are at least 1), and
        fewer than ``2 * pixels + 4`` terms, each bounded by a term of the returned sum.
        """
        mass = self.x.flatten(1).sum(1)
        largest_cost = float(self.transport.cost(dtype=torch.float64).max())
        pixels = self.x[0].numel()
        gain = 1 + (2 * self.transport.kernel_size**2 * math.sqrt(self.capacity_rounds) if self.box else 0.0)
        magnitude = (gain - 1) * pixels + gain * (1 + self.eps * mass + mass * (1 + largest_cost))
        return 2 * gamma(2 * pixels + 4, unit_roundoff(torch.float64)) * magnitude

    # ----------------------------------------------------------------------
    # The pixels' ranges
    # ----------------------------------------------------------------------

    @functools.cached_property
    def pixel_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Lower and upper bounds on every pixel of every image of the ball, each ``(B, C, H, W)`` float64.

        Every move off the window's centre costs at least 1 (the offsets are
        integer), so at most :math:`b` of mass enters or leaves a pixel, and a
        pixel holds at most the mass of the window around it:

        .. math::

            \max(0, x_j - b) \;\le\; x'_j \;\le\;
            \min\Big(\sum_{i \in \text{window}(j)} x_i,\; x_j + b,\; 1 \text{ (box)}\Big).
        """
        k = self.transport.kernel_size
        budget = self.budget.view(-1, 1, 1, 1)
        window = F.avg_pool2d(self.x, k, stride=1, padding=k // 2, count_include_pad=True, divisor_override=1)
        upper = torch.minimum(window, self.x + budget)
        return (self.x - budget).clamp_min(0.0), upper.clamp_max(1.0) if self.box else upper

    # ----------------------------------------------------------------------
    # The polytope
    # ----------------------------------------------------------------------

    def encode(self, program: Program, index: int) -> BallEncoding:
        r"""Add the ball of example ``index`` to ``program``: its plans and the image they transport to.

        The variables are the plan entries :math:`P_{io} \ge 0` on the rows
        with mass (the others are zero in every plan) and the pixels
        :math:`x'_j` that can receive mass, bounded by :attr:`pixel_bounds`
        (implied by the rows, so they change no optimum):

        .. math::

            \sum_o P_{io} = x_i, \qquad
            \sum_{i, o} c_o P_{io} \le b, \qquad
            x'_j = \sum_{(i, o):\, i + \mathrm{offset}(o) = j} P_{io}.

        With the box the pixels' upper bounds are at most 1, which is the capacity row.
        """
        x = self.x[index].numpy()
        channels, height, width = x.shape
        offset_cost, valid = (t.numpy() for t in window_layout(self.transport, height, width, dtype=torch.float64))
        mass = x.reshape(-1)
        rows = np.flatnonzero(mass > 0)
        row, offset = np.nonzero(valid[rows % (height * width)])
        source = rows[row]
        k, h = self.transport.kernel_size, self.transport.radius
        destination = source + (offset // k - h) * width + (offset % k - h)
        stay = np.flatnonzero(offset == k * k // 2)
        cost = offset_cost[offset]
        budget = float(self.budget[index])
        lower, upper = (bound[index].reshape(-1).numpy() for bound in self.pixel_bounds)

        plan = program.add_variables(0.0, mass[source])
        receiving = np.unique(destination)
        pixel = program.add_variables(lower[receiving], upper[receiving])
        variable = np.full(mass.size, -1, dtype=np.int64)
        variable[receiving] = pixel

        program.add_rows(row, plan, 1.0, mass[rows], mass[rows])
        moving = cost > 0
        if moving.any():
            program.add_rows(np.zeros(int(moving.sum())), plan[moving], cost[moving], -np.inf, budget)
        arriving = np.searchsorted(receiving, destination)
        program.add_rows(
            np.concatenate([np.arange(receiving.size), arriving]), np.concatenate([pixel, plan]),
            np.concatenate([np.ones(receiving.size), -np.ones(plan.size)]), np.zeros(receiving.size), 0.0,
        )
        image = ProgramValues(variable, np.ones(mass.size), np.zeros(mass.size), (channels, height, width))
        return BallEncoding(
            x, self.transport, self.box, budget, mass[rows], row, source, offset, destination, stay, cost, plan, image,
            lower, upper,
        )
