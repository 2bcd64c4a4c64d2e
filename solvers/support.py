r"""Support function of the local-transport Wasserstein ball: sound upper bounds on linear functionals.

For a coefficient image :math:`a` and a centre :math:`x` the *support
function* of the ball is

.. math::

    h(a) = \max_{x' \in \mathcal B_\varepsilon(x)} \langle a, x'\rangle
         = \max_{P \in \mathcal P_\varepsilon(x)} \sum_{i, o} P_{io}\, a_{i + \text{offset}(o)},

the linear maximization over local plans of :mod:`solvers.plan_space`
(budget :math:`b = \varepsilon\, m(x)`; with the box, also
:math:`P^\top \mathbf 1 \le 1`). Certificates need it for thousands of
coefficient images per example (one per neuron and direction), and they need
an *upper bound* that is valid whether or not a search converged, so this
module works on the Lagrangian dual, every value of which bounds the
maximum from above.

Without the box, only the budget is dualized:

.. math::

    D(\mu) = \langle a, x\rangle + \mu b + \sum_i x_i \max_k \big(g_{ik} - \mu c_k\big),
    \qquad g_{ik} = \max_{o:\, c_o = c_k} a_{i + \text{offset}(o)} - a_i,

where :math:`k` runs over the distinct offset costs :math:`c_k` (6 in a
:math:`5 \times 5` window with :math:`p = 1`): within a cost class a row can
only prefer its best offset. :math:`D` is convex and piecewise linear in
:math:`\mu \ge 0` and :math:`\min_\mu D(\mu) = h(a)` (strong duality of the
LP). The minimum is found by the cutting-plane search of
:func:`~solvers.plan_space.plan_linear_maximization` (the crossing of the
supporting lines at the two ends of a bracket), which closes in a handful of
steps; the bound returned is the smallest :math:`D` evaluated, so it is sound
at any iteration count, and ``exact`` says the search closed.

With the box the capacities get multipliers :math:`\nu \ge 0` too:

.. math::

    D(\mu, \nu) = \textstyle\sum_j \nu_j + D_{a - \nu}(\mu),

an unboxed dual of the shifted coefficients. :math:`\min_{\mu, \nu} D = h(a)`
again; ``capacity_rounds`` projected subgradient steps on :math:`\nu` (the
subgradient :math:`x'_j - 1` is the overflow of the unboxed optimal plan at
the current prices, increasing the price of a pixel pushed above 1) each
re-solve :math:`\mu` exactly. Every round's value is a valid bound; the
smallest is returned. When the plan of the final prices keeps every pixel
at most 1 it is feasible for the boxed ball, and its value, returned as
``lower``, brackets :math:`h(a)` from below: ``value - lower`` is then a
certified gap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .checks import check_iterations
from .geometry import LocalTransport

__all__ = ["SupportBound", "wasserstein_support"]


@dataclass
class SupportBound:
    """Result of :func:`wasserstein_support`, one entry per coefficient image.

    Attributes
    ----------
    value : Tensor (S,), float64
        An upper bound on :math:`\\max_{x'} \\langle a, x'\\rangle` over the ball.
    lower : Tensor (S,), float64
        The value of a point of the ball (a lower bound on the maximum), or
        ``-inf`` where the last plan found leaves the box.
    exact : Tensor (S,), bool
        ``value`` is the maximum to within the tolerance: without the box
        the dual search closed; with it, ``value - lower`` is within it.
    """

    value: torch.Tensor
    lower: torch.Tensor
    exact: torch.Tensor


class _Window:
    """The window's offsets grouped by cost, and for each pixel the flat index of each offset's destination."""

    def __init__(self, transport: LocalTransport, shape, device):
        k, h = transport.kernel_size, transport.radius
        channels, height, width = shape
        cost = transport.cost(dtype=torch.float64).flatten()
        # Rounding to 12 digits merges offsets whose costs are equal up to floating point.
        rounded = [round(float(c), 12) for c in cost]
        distinct = sorted(set(rounded))
        self.cost = torch.tensor(distinct, dtype=torch.float64, device=device)
        # Offsets ordered by class, so that each class is a contiguous slice.
        order = sorted(range(k * k), key=lambda o: distinct.index(rounded[o]))
        self.slices, start = [], 0
        for value in distinct:
            size = rounded.count(value)
            self.slices.append(slice(start, start + size))
            start += size
        dr = torch.tensor([o // k - h for o in order], device=device)
        ds = torch.tensor([o % k - h for o in order], device=device)
        pixel = torch.arange(channels * height * width, device=device)
        channel, row, col = pixel // (height * width), (pixel // width) % height, pixel % width
        r, c = row[:, None] + dr, col[:, None] + ds
        inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
        self.outside = channels * height * width  # index of a padding entry that holds -inf
        self.destination = torch.where(inside, channel[:, None] * height * width + r * width + c, self.outside)
        self.radius = h


def _class_maxima(a: torch.Tensor, rows: torch.Tensor, row_mass: torch.Tensor, window: _Window):
    """Best value and its flat destination per (spec, row, cost class), on the rows that matter.

    A row with mass whose window misses the support of ``a`` gains nothing
    by moving and stays in every optimal plan, so only the others are kept
    (compacted to a common count, padding with mass 0). Returns the kept
    rows (S, R'), their masses, and the values and destinations
    ``(S, R', n_classes)``; a destination outside the image is never chosen
    (its value is ``-inf``).
    """
    h = window.radius
    # The pixels within the window's reach of the support: window sums of the support's indicator,
    # by differences of cumulative sums along each axis (cheaper than a max filter on the CPU).
    reach = (a != 0).to(torch.float32).flatten(0, 1)
    for axis in (1, 2):
        padding = (0, 0, h + 1, h) if axis == 1 else (h + 1, h)
        total = F.pad(reach, padding).cumsum(axis)
        reach = total.narrow(axis, 2 * h + 1, reach.shape[axis]) - total.narrow(axis, 0, reach.shape[axis])
    reach = reach.view(a.shape[0], -1)
    relevant = (reach.gather(1, rows) > 0.5) & (row_mass > 0)
    count = max(int(relevant.sum(1).max()), 1) if relevant.numel() else 1
    keep = relevant.to(torch.float32).topk(count, dim=1).indices
    rows, row_mass = rows.gather(1, keep), torch.where(relevant.gather(1, keep), row_mass.gather(1, keep), 0.0)
    flat = F.pad(a.flatten(1), (0, 1), value=-math.inf)
    destination = window.destination[rows]  # (S, R', K)
    values = flat.gather(1, destination.flatten(1)).view(destination.shape)
    best, where = [], []
    for part in window.slices:
        value, index = values[:, :, part].max(-1)
        best.append(value)
        where.append(destination[:, :, part].gather(-1, index[..., None]).squeeze(-1))
    return rows, row_mass, torch.stack(best, -1), torch.stack(where, -1)


def _rows_with_mass(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example, the flat indices of its pixels with mass, padded to a common count (padding has mass 0)."""
    flat = x.flatten(1)
    count = int((flat > 0).sum(1).max()) if flat.numel() else 0
    count = max(count, 1)
    mass, index = flat.topk(count, dim=1)
    return index, mass


def _unboxed_dual(a, x_rows, mass, example, budget, base, window, tol, max_iter):
    """Minimize the budget dual of each spec.

    Returns the bound, exactness, the optimal plan's inflow and outflow
    images (moving rows only) and that plan's value.
    """
    rows, row_mass, gain, dest = _class_maxima(a, x_rows[example], mass[example].double(), window)
    gain = gain - gain[:, :, :1]  # class 0 is the identity offset: gains relative to staying
    cost = window.cost
    b = budget[example]

    def greedy(mu):
        reduced = gain - mu[:, None, None] * cost
        # First maximum along the cost-sorted classes: ties go to the cheaper class.
        choice = reduced.argmax(-1)
        best = reduced.gather(-1, choice[..., None]).squeeze(-1)
        value = (row_mass * best).sum(1)
        spent = (row_mass * cost[choice]).sum(1)
        return choice, value + mu * spent, spent, value  # gained (without the price), cost, f(mu)

    zero = torch.zeros_like(b)
    choice_lo, gained_lo, spent_lo, f_lo = greedy(zero)
    # Nothing may move without budget: the identity plan (class 0) is the only point.
    frozen = b <= 0
    choice_lo = torch.where(frozen[:, None], 0, choice_lo)
    gained_lo, spent_lo, f_lo = (torch.where(frozen, 0.0, t) for t in (gained_lo, spent_lo, f_lo))
    slack = spent_lo <= b
    ratio = (gain[:, :, 1:] / cost[1:]).amax((1, 2)).clamp_min(0)
    mu_lo, mu_hi = zero.clone(), torch.where(slack, zero, ratio * (1 + 1e-9) + 1e-300)
    choice_hi, gained_hi, spent_hi, f_hi = greedy(mu_hi)
    best = torch.where(slack, f_lo, torch.minimum(f_lo, f_hi + mu_hi * b))
    done, exact = slack.clone(), slack.clone()
    scale = gain.abs().amax((1, 2)).clamp_min(1e-300) * row_mass.sum(1).clamp_min(1e-300)
    for _ in range(max_iter):
        if bool(done.all()):
            break
        # Crossing of the supporting lines at the two ends of the bracket.
        mu = (gained_lo - gained_hi) / (spent_lo - spent_hi).clamp_min(1e-300)
        inside = (mu > mu_lo) & (mu < mu_hi) & ~done
        # Rounding can put the crossing on an end: the bracket is then as tight as it gets.
        exact |= ~inside & ~done
        done |= ~inside
        choice, gained, spent, f = greedy(torch.where(inside, mu, mu_hi))
        dual = f + mu * b
        line = gained_lo + mu * (b - spent_lo)
        best = torch.where(inside, torch.minimum(best, dual), best)
        closed = inside & (dual - line <= tol * scale)
        exact |= closed
        done |= closed
        low = inside & ~closed & (spent > b)
        high = inside & ~closed & ~(spent > b)
        mu_lo, gained_lo, spent_lo = torch.where(low, mu, mu_lo), torch.where(low, gained, gained_lo), torch.where(low, spent, spent_lo)
        choice_lo = torch.where(low[:, None], choice, choice_lo)
        mu_hi = torch.where(high | closed, mu, mu_hi)
        gained_hi, spent_hi = torch.where(high, gained, gained_hi), torch.where(high, spent, spent_hi)
        choice_hi = torch.where(high[:, None], choice, choice_hi)
    # The optimal plan mixes the two ends' greedy plans so that it spends exactly the budget.
    theta = ((b - spent_hi) / (spent_lo - spent_hi).clamp_min(1e-300)).clamp(0, 1)
    theta = torch.where(slack, torch.ones_like(theta), theta)
    inflow = torch.zeros(a.shape[0], a[0].numel(), dtype=torch.float64, device=a.device)
    for choice, weight in ((choice_lo, theta), (choice_hi, 1 - theta)):
        target = dest.gather(-1, choice[..., None]).squeeze(-1)
        inflow.scatter_add_(1, target, row_mass * weight[:, None])
    outflow = torch.zeros_like(inflow).scatter_add_(1, rows, row_mass)
    # D(mu) + <a, x>: the gains were relative to the identity plan.
    return base + best, exact, inflow - outflow, base + (theta * gained_lo + (1 - theta) * gained_hi)


@torch.no_grad()
def wasserstein_support(
    coefficients: torch.Tensor,
    x: torch.Tensor,
    example: torch.Tensor,
    eps,
    transport: LocalTransport,
    *,
    box: bool = False,
    capacity_rounds: int = 10,
    tol: float = 1e-9,
    max_iter: int = 60,
) -> SupportBound:
    r"""Upper bounds on :math:`\max_{x' \in \mathcal B_\varepsilon(x)} \langle a, x'\rangle` for many :math:`a`.

    Parameters
    ----------
    coefficients : Tensor (S, C, H, W)
        The coefficient images :math:`a_s`, any sign.
    x : Tensor (B, C, H, W)
        Centre images, non-negative (and at most 1 with ``box``).
    example : Tensor (S,), int64
        The centre of each coefficient image.
    eps : float or Tensor (B,)
        Radii in normalized units (budget :math:`\varepsilon\, m(x)`).
    transport : LocalTransport
        Window and cost exponent.
    box : bool, default False
        Also keep every pixel at most 1.
    capacity_rounds : int, default 10
        With the box: subgradient steps on the capacity prices.
    tol : float, default 1e-9
        Duality gap, relative to :math:`m(x) \max |g|`, at which a search counts as closed.
    max_iter : int, default 60
        Cutting-plane steps of each budget search.

    Returns
    -------
    SupportBound
        In float64; every ``value`` is a valid upper bound.
    """
    if coefficients.dim() != 4 or x.dim() != 4 or coefficients.shape[1:] != x.shape[1:]:
        raise ValueError(
            f"coefficients {tuple(coefficients.shape)} and x {tuple(x.shape)} must both be (batch, C, H, W) with equal C, H, W"
        )
    if example.shape != (coefficients.shape[0],):
        raise ValueError(f"example has shape {tuple(example.shape)}: it must be ({coefficients.shape[0]},)")
    if bool((x < 0).any()) or (box and bool((x > 1).any())):
        raise ValueError("x must be non-negative" + (" and at most 1 with box=True" if box else ""))
    capacity_rounds = check_iterations("capacity_rounds", capacity_rounds)
    a = coefficients.double()
    x64 = x.double()
    eps = torch.as_tensor(eps, dtype=torch.float64, device=x.device).expand(x.shape[0])
    if bool((~torch.isfinite(eps) | (eps < 0)).any()):
        raise ValueError(f"eps={eps.tolist()} is invalid: radii must be finite and >= 0")
    budget = eps * x64.flatten(1).sum(1)
    window = _Window(transport, x.shape[1:], x.device)
    rows, mass = _rows_with_mass(x64)
    centre = x64[example]
    base = (a * centre).flatten(1).sum(1)
    value, exact, moved, attained = _unboxed_dual(a, rows, mass, example, budget, base, window, tol, max_iter)
    lower = attained.clone()
    if not box:
        return SupportBound(value, lower, exact)

    centre_flat = centre.flatten(1)
    image = centre_flat + moved
    scale = a.flatten(1).abs().amax(1).clamp_min(1e-300) * x64.flatten(1).sum(1)[example].clamp_min(1e-300)
    lower = torch.where((image <= 1 + 1e-12).all(1), attained, torch.full_like(attained, -math.inf))
    exact = value - lower <= tol * scale
    # Only the specifications whose unboxed plan leaves the box get prices; the others are already exact.
    open_ = (~exact).nonzero().flatten()
    a_open, centre_open, example_open = a[open_], centre_flat[open_], example[open_]
    image, prices = image[open_], torch.zeros_like(centre_open)
    value_open, lower_open = value[open_], lower[open_]
    step_scale = a_open.flatten(1).abs().amax(1)
    for round_ in range(capacity_rounds if open_.numel() else 0):
        # A diminishing step in the coefficients' units: prices rise on overflowing pixels, fall elsewhere.
        prices = (prices + (step_scale / math.sqrt(round_ + 1))[:, None] * (image - 1)).clamp_min(0)
        shifted = a_open - prices.view_as(a_open)
        base_shifted = (shifted.flatten(1) * centre_open).sum(1)
        bound, _, moved, _ = _unboxed_dual(shifted, rows, mass, example_open, budget, base_shifted, window, tol, max_iter)
        value_open = torch.minimum(value_open, bound + prices.sum(1))
        image = centre_open + moved
        # A plan that keeps every pixel in the box is a point of the boxed ball: its value bounds the maximum from below.
        inside_box = (image <= 1 + 1e-12).all(1)
        lower_open = torch.where(inside_box, torch.maximum(lower_open, (a_open.flatten(1) * image).sum(1)), lower_open)
    value[open_], lower[open_] = value_open, lower_open
    exact = value - lower <= tol * scale
    return SupportBound(value, lower, exact)
