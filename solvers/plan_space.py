r"""Plan-space attacks: projected gradient and Frank-Wolfe on local transport plans.

Wu, Wang and Yu (2020, *Stronger and faster Wasserstein adversarial
attacks*) attack in the space of transport plans instead of images: the
adversarial image is the column sum of a plan, and the ball is a polytope of
plans with a cheap exact projection and a cheap exact linear maximization.

Layout
------
An image batch ``x`` has shape ``(B, C, H, W)``; with the window ``k x k``,
``h = k // 2``, ``N = H W`` and ``K = k^2``, a *plan* is a tensor of shape
``(B, C, N, K)``: entry ``P[b, c, i, o]`` is the mass moved from pixel ``i``
(row-major ``r W + s``) of channel ``c`` to pixel ``i + offset(o)``, where
offset ``o = (dr + h) k + (ds + h)`` is the window position of
``(dr, ds)``, the order of ``LocalTransport.cost().flatten()`` and of
:func:`torch.nn.functional.unfold`. Offsets that leave the image are
*invalid* (``valid[i, o]`` is False) and carry exactly 0. The offset
``(0, 0)`` is ``o = K // 2``, the only one with zero cost.

The image of a plan is its column sums, :math:`z_j = \sum_{(i, o):\,
i + \text{offset}(o) = j} P_{io}` (:func:`plan_image`, a ``fold``); its
adjoint gathers an image-space gradient ``g`` at each entry's destination,
:math:`G_{io} = g_{i + \text{offset}(o)}` (:func:`plan_gradient`, an
``unfold``), which is the chain rule through the column sums.

The ball in plan space, one budget per image over all channels, is

.. math::

    \mathcal{P}_\varepsilon(x) = \{ P \ge 0 \text{ local} :\;
        P \mathbf{1} = x,\; \langle c, P \rangle \le \varepsilon\, m(x) \},

and its image under the column sums is the Wasserstein ball of
:mod:`solvers.geometry`. The *identity plan* (all mass on offset ``(0, 0)``)
costs nothing and has image ``x``. With the box option the plans also satisfy
:math:`P^\top \mathbf{1} \le 1` (no pixel above 1).

Contents
--------
:func:`project_plans`
    Exact Euclidean projection onto :math:`\mathcal{P}_\varepsilon(x)` (a
    safeguarded Newton search on the budget multiplier over row-wise simplex
    projections), and, with ``box=True``, onto its intersection with the box
    by a projected semismooth Newton method on the capacity and budget
    multipliers, then a feasibility repair.
:func:`plan_linear_maximization`
    Exact :math:`\max_{P \in \mathcal{P}_\varepsilon(x)} \langle G, P\rangle`
    by a one-dimensional dual search (the linear maximization oracle); with
    ``box=True``, over the boxed set by proximal steps on the boxed
    projection, with a certified duality gap.
:class:`PlanPGDIterate`, :class:`FrankWolfeIterate`
    The two attacks as :class:`~solvers.iterate.BallIterate` objects.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .geometry import LocalTransport, check_images, check_nonnegative_eps
from .iterate import IterateState, StepReport, is_zero_gradient
from .checks import check_iterations, check_positive
from .device import sync_interval

__all__ = [
    "FrankWolfeIterate",
    "PlanMaximization",
    "PlanPGDIterate",
    "PlanProjection",
    "identity_plan",
    "plan_cost",
    "plan_gradient",
    "plan_image",
    "plan_linear_maximization",
    "project_plans",
    "repair_capacity",
    "window_layout",
]


# --------------------------------------------------------------------------
# Layout: offsets, validity, column sums and their adjoint
# --------------------------------------------------------------------------


def _offsets(kernel_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column displacement ``(dr, ds)`` of each window offset, shape ``(K,)`` each."""
    h = kernel_size // 2
    steps = torch.arange(-h, h + 1, device=device)
    return steps.repeat_interleave(kernel_size), steps.repeat(kernel_size)


def _kernel_size_of(plan: torch.Tensor) -> int:
    k = math.isqrt(plan.shape[-1])
    if k * k != plan.shape[-1] or k < 3 or k % 2 == 0:
        raise ValueError(f"plan has {plan.shape[-1]} offsets per row: it must be k^2 for an odd window size k >= 3")
    return k


def window_layout(
    transport: LocalTransport, height: int, width: int, dtype: torch.dtype = torch.float32, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cost per offset and validity mask of the plans of ``height x width`` images.

    Parameters
    ----------
    transport : LocalTransport
        Window size ``k`` and cost exponent ``p``.
    height, width : int
        Image size; ``N = height * width``.
    dtype, device
        Of the cost vector.

    Returns
    -------
    cost : Tensor (K,)
        :math:`c_o = (dr^2 + ds^2)^{p/2}`, ``LocalTransport.cost().flatten()``.
    valid : Tensor (N, K), bool
        ``valid[i, o]``: the offset ``o`` from pixel ``i`` stays inside the image.
    """
    k = transport.kernel_size
    dr, ds = _offsets(k, device)
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    r, s = rows[:, None] + dr, cols[:, None] + ds
    valid = (r >= 0) & (r < height) & (s >= 0) & (s < width)
    return transport.cost(dtype=dtype, device=device).flatten(), valid


def _incoming_index(kernel_size: int, height: int, width: int, device) -> torch.Tensor:
    """For destination ``j`` and offset ``o``, the flat plan index ``i K + o`` of the entry arriving at ``j``.

    Shape ``(N, K)``; an offset whose source ``j - offset(o)`` is outside the
    image points at ``N K``, one past the end (a padding slot).
    """
    dr, ds = _offsets(kernel_size, device)
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    r, s = rows[:, None] - dr, cols[:, None] - ds
    inside = (r >= 0) & (r < height) & (s >= 0) & (s < width)
    k2 = kernel_size * kernel_size
    flat = (r * width + s) * k2 + torch.arange(k2, device=device)
    return torch.where(inside, flat, height * width * k2)


def plan_image(plan: torch.Tensor, height: int, width: int) -> torch.Tensor:
    r"""Column sums of plans: the images they transport to.

    .. math:: z_{b,c,j} = \sum_{(i,o):\, i + \mathrm{offset}(o) = j} P_{b,c,i,o}

    Parameters
    ----------
    plan : Tensor (B, C, N, K)
    height, width : int
        With ``height * width = N``.

    Returns
    -------
    Tensor (B, C, H, W)
    """
    batch, channels, pixels, k2 = plan.shape
    k = _kernel_size_of(plan)
    columns = plan.transpose(2, 3).reshape(batch, channels * k2, pixels)
    return F.fold(columns, (height, width), k, padding=k // 2)


def plan_gradient(image_grad: torch.Tensor, kernel_size: int) -> torch.Tensor:
    r"""Gather an image-space tensor at each plan entry's destination (adjoint of :func:`plan_image`).

    .. math:: G_{b,c,i,o} = g_{b,c,\,i + \mathrm{offset}(o)}

    (0 for invalid offsets). If ``g`` is the gradient of a loss at the image
    ``plan_image(P)``, ``G`` is its gradient with respect to ``P``.

    Parameters
    ----------
    image_grad : Tensor (B, C, H, W)
    kernel_size : int

    Returns
    -------
    Tensor (B, C, H W, k^2)
    """
    batch, channels, height, width = image_grad.shape
    k2 = kernel_size * kernel_size
    patches = F.unfold(image_grad, kernel_size, padding=kernel_size // 2)
    return patches.view(batch, channels, k2, height * width).transpose(2, 3)


def identity_plan(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """The plan that moves nothing: all of ``x`` on offset ``(0, 0)``; shape ``(B, C, H W, k^2)``."""
    batch, channels, height, width = x.shape
    k2 = kernel_size * kernel_size
    plan = x.new_zeros(batch, channels, height * width, k2)
    plan[..., k2 // 2] = x.reshape(batch, channels, height * width)
    return plan


def plan_cost(plan: torch.Tensor, cost: torch.Tensor) -> torch.Tensor:
    r"""Un-normalized transport cost :math:`\langle c, P_b\rangle` of each plan, shape ``(B,)``."""
    return (plan.flatten(0, -2) @ cost).view(plan.shape[0], -1).sum(1)


# --------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------


def _check_plan_problem(name: str, values: torch.Tensor, x: torch.Tensor, cost: torch.Tensor, valid: torch.Tensor) -> None:
    """Shapes, dtypes and finiteness of a plan-space problem, with messages naming the culprit."""
    if not isinstance(values, torch.Tensor) or values.dim() != 4:
        raise ValueError(f"{name} must be a (B, C, H*W, k*k) tensor, got {getattr(values, 'shape', type(values).__name__)}")
    check_images(x, x)
    batch, channels, height, width = x.shape
    _kernel_size_of(values)
    k2 = values.shape[-1]
    if values.shape != (batch, channels, height * width, k2):
        raise ValueError(
            f"{name} has shape {tuple(values.shape)}: for x of shape {tuple(x.shape)} it must be "
            f"({batch}, {channels}, {height * width}, k*k)"
        )
    if values.dtype != x.dtype or values.device != x.device:
        raise ValueError(f"{name} ({values.dtype}, {values.device}) and x ({x.dtype}, {x.device}) must share dtype and device")
    if cost.shape != (k2,) or valid.shape != (height * width, k2) or valid.dtype != torch.bool:
        raise ValueError(
            f"cost {tuple(cost.shape)} and valid {tuple(valid.shape)} ({valid.dtype}) do not fit {k2} offsets "
            f"of {height}x{width} images: build them with window_layout"
        )
    # A finite sum (one pass, no mask) proves every entry finite; only a sum that is not finite
    # (NaN or inf somewhere, or finite values that overflow it) needs the entrywise test.
    if not bool(torch.isfinite(values.sum())) and not bool(torch.isfinite(values).all()):
        raise ValueError(f"{name} has NaN or infinite entries")


def _check_box_centres(x: torch.Tensor) -> None:
    if bool((x > 1).any()):
        raise ValueError(
            f"box=True needs centres with pixels <= 1 (max {float(x.max()):.6g}): otherwise even x is outside the box"
        )


# --------------------------------------------------------------------------
# Row-wise simplex projection (sorting, Duchi et al. 2008 / Condat 2016)
# --------------------------------------------------------------------------


def _project_rows_onto_simplex(values: torch.Tensor, mass: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    r"""Project each row onto :math:`\{p \ge 0,\ p = 0 \text{ off } \texttt{valid},\ \sum p = a\}`.

    The answer is :math:`p = (v - \tau)_+` with the threshold
    :math:`\tau = \max_j (\sum_{l \le j} v_{(l)} - a) / j` over the valid
    entries sorted in decreasing order (Duchi et al. 2008). The projection is
    invariant to adding a constant to a row, so rows are first shifted to
    have maximum 0; entries below :math:`-a` can then never reach the
    support (:math:`\tau \ge v_{(1)} - a = -a`) and are raised to
    :math:`-2a`, which keeps every sum bounded by :math:`2 K a` whatever the
    size of the target, and also disposes of the invalid entries. (Raising
    them to :math:`-a` itself would tie them with :math:`\tau` when the
    support is a single entry, and rounding would let them in.)

    Parameters
    ----------
    values : Tensor (R, K)
    mass : Tensor (R,), >= 0
    valid : Tensor (R, K), bool; at least one True per row

    Returns
    -------
    rows : Tensor (R, K)
        Exactly 0 off ``valid`` and on rows with zero mass.
    threshold : Tensor (R,)
        :math:`\tau`, in the units of ``values``.
    """
    shifted = values.masked_fill(~valid, -math.inf)
    top = shifted.amax(-1, keepdim=True)
    shifted = shifted - top
    shifted = torch.maximum(shifted, -2 * mass[:, None])
    ordered = shifted.sort(-1, descending=True).values
    excess = ordered.cumsum(-1) - mass[:, None]
    ranks = torch.arange(1, values.shape[-1] + 1, dtype=values.dtype, device=values.device)
    support = (ordered * ranks > excess).sum(-1, keepdim=True).clamp_min(1)
    threshold = excess.gather(-1, support - 1) / support
    return (shifted - threshold).clamp_min(0).masked_fill(~valid, 0.0), (threshold + top)[:, 0]


def _project_rows_from_support(
    values: torch.Tensor, mass: torch.Tensor, valid: torch.Tensor, support: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r""":func:`_project_rows_onto_simplex` given a guess of each row's support (``values`` -inf off ``valid``).

    With the guess :math:`S`, :math:`\tau = (\sum_S v - a) / |S|` is the
    exact threshold whenever :math:`\{v > \tau\} = S`: then
    :math:`(v - \tau)_+` is positive exactly on :math:`S` and sums to
    :math:`a`. Rows where the test fails are projected by sorting. Between
    nearby dual points most supports do not change, so most rows skip the
    sort, the bulk of the projection's cost.
    """
    count = support.sum(-1).clamp_min(1)
    threshold = (torch.where(support, values, 0.0).sum(-1) - mass) / count
    wrong = torch.nonzero(((values > threshold[:, None]) != support).any(-1)).flatten()
    rows = (values - threshold[:, None]).clamp_min_(0)
    if wrong.numel() > 0:
        rows[wrong], threshold[wrong] = _project_rows_onto_simplex(values[wrong], mass[wrong], valid[wrong])
    return rows, threshold


def _image_sums(per_row: torch.Tensor, row_image: torch.Tensor, batch: int) -> torch.Tensor:
    """Sum a per-row quantity over the rows of each image, in float64."""
    return torch.zeros(batch, dtype=torch.float64, device=per_row.device).index_add_(0, row_image, per_row.double())


@dataclass
class _Rows:
    """The rows of a batch of plans that carry mass (``x_i > 0``), the only ones that can move.

    Zero-mass rows are all-zero in every feasible plan, so solvers work on
    this compact ``(R, K)`` view (on MNIST about a fifth of the pixels).
    """

    index: torch.Tensor  # (R,) flat row index into (B*C*N)
    image: torch.Tensor  # (R,) example of each row
    mass: torch.Tensor  # (R,) x_i
    valid: torch.Tensor  # (R, K)

    @classmethod
    def of(cls, x: torch.Tensor, valid: torch.Tensor) -> _Rows:
        channels, height, width = x.shape[1:]
        flat = x.reshape(-1)
        index = torch.nonzero(flat > 0).flatten()
        pixels = height * width
        return cls(index, index // (channels * pixels), flat[index], valid[index % pixels])

    def scatter(self, rows: torch.Tensor, shape) -> torch.Tensor:
        """The full ``(B, C, N, K)`` plans with ``rows`` on the massive rows and zeros elsewhere."""
        plan = rows.new_zeros(shape[0] * shape[1] * shape[2], shape[3])
        plan[self.index] = rows
        return plan.view(shape)


def _fit_budget(rows: torch.Tensor, data: _Rows, cost: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    r"""Mix plans that overspend (by rounding) with the identity plan, which costs nothing.

    :math:`P \leftarrow \theta P + (1 - \theta) D` with
    :math:`\theta = b / \langle c, P\rangle`; rows keep their sums and
    entries their sign, so the result is exactly in the ball.
    """
    spent = _image_sums(rows @ cost, data.image, budget.shape[0])
    over = spent > budget.double()
    if not bool(over.any()):
        return rows
    theta = torch.where(over, budget.double() / spent.clamp_min(torch.finfo(torch.float64).tiny), 1.0).to(rows.dtype)
    row_theta = theta[data.image]
    rows = rows * row_theta[:, None]
    rows[:, rows.shape[1] // 2] += (1 - row_theta) * data.mass
    return rows


# --------------------------------------------------------------------------
# Exact projection onto the ball of plans
# --------------------------------------------------------------------------


@dataclass
class PlanProjection:
    r"""Result of :func:`project_plans`; every field has the batch first.

    Attributes
    ----------
    plan : Tensor (B, C, N, K)
        The projection, always feasible.
    multiplier : Tensor (B,)
        The budget multiplier :math:`\mu \ge 0` found (0 when the budget is
        slack); pass it back as ``multiplier`` to warm-start the next call.
    iterations : Tensor (B,), int64
        Multiplier evaluations (each one a row-wise simplex projection); with
        ``box=True``, Newton iterations on the dual.
    converged : Tensor (B,), bool
        The tolerance was met (or the multiplier was resolved to the working
        precision); with ``box=True``, the KKT residual met ``box_tol`` and
        ``tol`` and the repair did not have to fall back on the identity plan.
    capacity_multiplier : Tensor (B, C, H, W) or None
        With ``box=True``, the multipliers :math:`\nu \ge 0` of the pixel
        capacities (0 where a pixel is below 1); pass them back as
        ``capacity_multiplier`` to warm-start the next call.
    """

    plan: torch.Tensor
    multiplier: torch.Tensor
    iterations: torch.Tensor
    converged: torch.Tensor
    capacity_multiplier: torch.Tensor | None = None


def _project_ball(
    target: torch.Tensor,
    x: torch.Tensor,
    cost: torch.Tensor,
    valid: torch.Tensor,
    budget: torch.Tensor,
    multiplier: torch.Tensor,
    tol: float,
    max_iter: int,
) -> PlanProjection:
    """:func:`project_plans` without the box, on validated inputs; ``budget`` is ``eps * m(x)``."""
    batch = target.shape[0]
    dtype, device = target.dtype, target.device
    data = _Rows.of(x, valid)
    targets = target.reshape(-1, target.shape[-1])[data.index]
    center = target.shape[-1] // 2
    budget64 = budget.double()
    resolution = 4 * torch.finfo(dtype).eps

    # Above this multiplier every row keeps all its mass in place (cost 0):
    # the centre entry beats entry o by at least the row's mass.
    raised = (targets - targets[:, center : center + 1] + data.mass[:, None]) / cost.clamp_min(1e-30)
    raised = raised.masked_fill(~data.valid, -math.inf)
    raised[:, center] = 0.0
    ceiling = torch.zeros(batch, dtype=dtype, device=device).scatter_reduce_(
        0, data.image, raised.amax(-1), "amax", include_self=True
    )
    # Keep mu * cost finite; larger multipliers change nothing anyway.
    ceiling = ceiling.clamp_max(torch.finfo(dtype).max / (4 * float(cost.max()))).double()

    lower = torch.zeros(batch, dtype=torch.float64, device=device)
    lower_known = torch.zeros(batch, dtype=torch.bool, device=device)
    upper = ceiling.clone()
    mu = torch.minimum(multiplier.double().clamp_min(0), ceiling)
    iterations = torch.zeros(batch, dtype=torch.int64, device=device)
    converged = torch.zeros(batch, dtype=torch.bool, device=device)
    rows = torch.zeros_like(targets)
    # Nothing may move on a zero budget: the answer is the identity plan.
    settled = budget <= 0
    rows[settled[data.image], center] = data.mass[settled[data.image]]
    converged |= settled
    mu = torch.where(settled, 0.0, mu)

    position = torch.full((batch,), -1, dtype=torch.int64, device=device)
    interval = sync_interval(device)
    for step in range(max_iter):
        # The active set is refreshed (a host sync) every ``interval`` steps; in
        # between, examples that finish stay in it, frozen.
        if step % interval == 0:
            active = torch.nonzero(~settled).flatten()
            if active.numel() == 0:
                break
            position[active] = torch.arange(active.numel(), device=device)
            on = torch.nonzero(~settled[data.image]).flatten()
            local = position[data.image[on]]
        frozen = settled[active]
        mu_now = mu[active]
        shifted_targets = targets[on] - mu_now.to(dtype)[local, None] * cost
        plan_rows, _ = _project_rows_onto_simplex(shifted_targets, data.mass[on], data.valid[on])
        iterations[active] += (~frozen).long()

        spent = _image_sums(plan_rows @ cost, local, active.numel())
        # d spent / d mu = -sum_rows sum_support (c_o - mean_support c)^2 on the current linear piece.
        support = (plan_rows > 0).to(dtype)
        count = support.sum(-1).clamp_min(1)
        first, second = support @ cost, support @ (cost * cost)
        slope = -_image_sums(second - first * first / count, local, active.numel())

        gap = spent - budget64[active]
        feasible = gap <= 0
        lower_now = torch.where(feasible, lower[active], mu_now)
        upper_now = torch.where(feasible, mu_now, upper[active])
        known_now = lower_known[active] | ~feasible
        newton = mu_now - gap / slope.clamp_max(-torch.finfo(torch.float64).tiny)
        bisection = 0.5 * (lower_now + upper_now)
        inside = (newton > lower_now) & (newton < upper_now) & (slope < 0)
        candidate = torch.where(inside, newton, bisection)
        # The bracket's lower end is 0 until some mu is seen to overspend: try 0 itself first.
        candidate = torch.where(~known_now & (newton <= 0) & (slope < 0), 0.0, candidate)

        done = (gap.abs() <= tol * budget64[active]) | (feasible & (mu_now == 0))
        stalled = ((candidate - mu_now).abs() <= resolution * mu_now) | (upper_now - lower_now <= resolution * upper_now)
        finished = (done | stalled) & ~frozen
        moving = ~(done | stalled) & ~frozen
        # Finished examples keep the plan just computed (slightly overspending
        # ones are mixed with the identity at the end).
        rows[on] = torch.where(finished[local, None], plan_rows, rows[on])
        converged[active] |= finished
        settled[active] |= finished
        lower[active] = torch.where(moving, lower_now, lower[active])
        upper[active] = torch.where(moving, upper_now, upper[active])
        lower_known[active] = torch.where(moving, known_now, lower_known[active])
        mu[active] = torch.where(moving, candidate, mu_now)

    unfinished = ~settled
    if bool(unfinished.any()):
        # Out of iterations: fall back on the feasible end of the bracket.
        mu = torch.where(unfinished, upper, mu)
        on = torch.nonzero(unfinished[data.image]).flatten()
        shifted_targets = targets[on] - mu.to(dtype)[data.image[on], None] * cost
        rows[on], _ = _project_rows_onto_simplex(shifted_targets, data.mass[on], data.valid[on])

    rows = _fit_budget(rows, data, cost, budget)
    return PlanProjection(data.scatter(rows, target.shape), mu.to(dtype), iterations, converged)


# --------------------------------------------------------------------------
# The box: a semismooth Newton method on the dual of the capacities
# --------------------------------------------------------------------------


@dataclass
class _CapacityDual:
    r"""The projection onto the boxed ball of plans, as a function of its multipliers.

    For multipliers :math:`\nu \ge 0` of the column capacities and
    :math:`\mu \ge 0` of the budget, the Lagrangian is minimized by the
    row-wise simplex projection :math:`P = \Pi_\Delta(W)` of
    :math:`W = T - \mu c - \nu_{\text{dest}}`; the dual function is

    .. math::

        D(\nu, \mu) = \tfrac12 \|P - W\|^2 + \langle s, T\rangle - \tfrac12 \|s\|^2
            - \mu b - \textstyle\sum_j \nu_j, \qquad s = T - W,

    concave and once differentiable with gradient
    :math:`(P^\top \mathbf 1 - 1,\ \langle c, P\rangle - b)` and
    generalized Hessian :math:`-A J A^\top`, where :math:`A^\top` spreads
    :math:`(\nu, \mu)` over the entries and :math:`J` is the Jacobian of the
    row-wise projection (on the support :math:`S_i` of row ``i``,
    :math:`I - \mathbf 1 \mathbf 1^\top / |S_i|`).

    With :math:`P = (W - \tau)_+` row by row, the value is
    :math:`\sum_i \big(\tfrac12 \|T_i\|^2 - \tfrac12 \|P_i\|^2 - \tau_i x_i\big)
    - \mu b - \sum_j \nu_j` (expand the squares; on the support
    :math:`W = P + \tau`), which needs no pass over the entries beyond
    :math:`\|P_i\|^2`.

    Everything is float64 on the massive rows (:class:`_Rows`); columns are
    the ``B C N`` pixels, flat, plus one sink slot (index ``B C N``) for the
    offsets that leave the image.
    """

    data: _Rows
    targets: torch.Tensor  # (R, K) float64, -inf off the window
    cost: torch.Tensor  # (K,) float64
    budget: torch.Tensor  # (B,) float64
    destination: torch.Tensor  # (R, K) flat column of each entry, sink when invalid
    batch: int
    columns_per_image: int
    mass: torch.Tensor  # (R,) float64
    target_norms: torch.Tensor  # (B,) float64, the constant sum_i ||T_i||^2 / 2 of the value

    @classmethod
    def of(cls, target, x, cost, valid, budget) -> _CapacityDual:
        data = _Rows.of(x, valid)
        destination = _destinations(data, x, math.isqrt(target.shape[-1]))
        # -inf off the window: every entry the row-wise projections see there is then -inf too, with no mask.
        targets = target.reshape(-1, target.shape[-1])[data.index].double().masked_fill(~data.valid, -math.inf)
        norms = _image_sums(0.5 * targets.masked_fill(~data.valid, 0.0).square().sum(-1), data.image, x.shape[0])
        return cls(
            data, targets, cost.double(), budget.double(), destination, x.shape[0], x[0].numel(), data.mass.double(), norms
        )

    def restrict(self, examples: torch.Tensor) -> tuple[_CapacityDual, torch.Tensor | None]:
        """The dual of the examples ``examples`` (increasing) alone, and where their rows are among these.

        Examples are independent problems, so this is the same dual on fewer
        examples, its columns renumbered; row order is kept, so every sum
        adds the same terms in the same order as on the whole batch. With
        every example, ``self`` and ``None`` (no rows to pick).
        """
        count = examples.numel()
        if count == self.batch:
            return self, None
        local = torch.full((self.batch,), -1, dtype=torch.int64, device=examples.device)
        local[examples] = torch.arange(count, device=examples.device)
        row_local = local[self.data.image]
        on = torch.nonzero(row_local >= 0).flatten()
        image = row_local[on]
        shift = (image - self.data.image[on]) * self.columns_per_image
        valid = self.data.valid[on]
        destination = torch.where(valid, self.destination[on] + shift[:, None], count * self.columns_per_image)
        data = _Rows(self.data.index[on] + shift, image, self.data.mass[on], valid)
        return _CapacityDual(
            data, self.targets[on], self.cost, self.budget[examples], destination, count, self.columns_per_image,
            self.mass[on], self.target_norms[examples],
        ), on

    def spread(self, nu: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        r""":math:`A^\top(\nu, \mu)`: each entry's multiplier, shape ``(R, K)``.

        Invalid entries get a meaningless value: every user masks them.
        """
        padded = torch.cat([nu.reshape(-1), nu.new_zeros(1)])
        gathered = padded.index_select(0, self.destination.flatten()).view(self.destination.shape)
        return gathered + mu[self.data.image, None] * self.cost

    def collect(self, entries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:math:`A`: column sums ``(B, C N)`` and costs ``(B,)`` of per-entry values."""
        sums = entries.new_zeros(self.batch * self.columns_per_image + 1)
        sums.index_add_(0, self.destination.flatten(), entries.flatten())
        return sums[:-1].view(self.batch, -1), _image_sums(entries @ self.cost, self.data.image, self.batch)

    def evaluate(self, nu: torch.Tensor, mu: torch.Tensor, support: torch.Tensor | None = None):
        """Plan rows, dual gradient (columns, budget) and dual value at ``(nu, mu)``.

        ``support``: the plan's support at a nearby point, a guess that saves most rows their sort.
        """
        values = self.targets - self.spread(nu, mu)
        if support is None:
            rows, threshold = _project_rows_onto_simplex(values, self.mass, self.data.valid)
        else:
            rows, threshold = _project_rows_from_support(values, self.mass, self.data.valid, support)
        filled, spent = self.collect(rows)
        per_row = 0.5 * rows.square().sum(-1) + threshold * self.mass
        value = self.target_norms - _image_sums(per_row, self.data.image, self.batch) - mu * self.budget - nu.sum(1)
        return rows, filled - 1, spent - self.budget, value


def _natural_residual(nu, mu, grad_nu, grad_mu, budget):
    r"""Per example: max column residual :math:`|\nu - (\nu + g)_+|` and the budget's, relative to the budget."""
    column = (nu - (nu + grad_nu).clamp_min(0)).abs().amax(1)
    budget = (mu - (mu + grad_mu).clamp_min(0)).abs() / budget.clamp_min(torch.finfo(torch.float64).tiny)
    return column, budget


class _NewtonSystem:
    r""":math:`A J A^\top + \delta I` on the free multipliers, in the few entries that touch them.

    On row ``i`` with support :math:`S_i`, :math:`J_i` centres a vector over
    :math:`S_i`. With :math:`v` on the free columns (0 elsewhere) and
    :math:`\bar c_i` the mean cost over :math:`S_i`, the product is

    .. math::

        (H v)_j = \sum_{e \to j} \big(v_e - \overline{v}_{i(e)}\big) + v_\mu \sum_{e \to j} (c_e - \bar c_{i(e)}),
        \qquad (H v)_\mu = \sum_e (c_e - \bar c_{i(e)})\, v_e + v_\mu \sum_i \sum_{e \in S_i} (c_e - \bar c_i)^2

    (:math:`v_e` the value at entry ``e``'s destination, :math:`c^\top J u = (J c)^\top u`),
    so only the support's entries into free columns (pixels at capacity, a
    few dozen per image) take part in a product; the rest is set up once
    per Newton step. Column vectors are ``(F,)``, the free columns in flat
    order; budget vectors ``(B,)``, 0 where not free.
    """

    def __init__(self, dual: _CapacityDual, support, free_nu, free_mu, damping):
        batch, columns = free_nu.shape
        k2 = support.shape[1]
        chosen = support.double()
        self.inverse_count = 1 / chosen.sum(-1).clamp_min(1)
        first, second = chosen @ dual.cost, chosen @ dual.cost.square()
        self.free = torch.nonzero(free_nu.flatten()).flatten()
        self.free_image = self.free // columns
        free_count = self.free.numel()
        # Slot of each entry's destination among the free columns (F: held at 0, or the sink).
        position = torch.full((batch * columns + 1,), free_count, dtype=torch.int64, device=support.device)
        position[self.free] = torch.arange(free_count, device=support.device)
        slot = position[dual.destination]
        entry = torch.nonzero(((slot < free_count) & support).flatten()).flatten()
        self.row = entry // k2
        self.slot = slot.flatten()[entry]
        self.centred_cost = dual.cost[entry % k2] - (first * self.inverse_count)[self.row]
        self.entry_image = dual.data.image[self.row]
        self.rows, self.batch, self.shape, self.free_mu = support.shape[0], batch, free_nu.shape, free_mu
        self.column_cost = self._to_columns(self.centred_cost)
        self.column_damping = damping[self.free_image]
        self.diagonal_nu = self._to_columns((1 - self.inverse_count)[self.row]) + self.column_damping
        self.diagonal_mu = _image_sums(second - first * first * self.inverse_count, dual.data.image, batch) + damping

    def _to_columns(self, entries):
        return entries.new_zeros(self.free.numel()).index_add_(0, self.slot, entries)

    def columns(self, nu: torch.Tensor) -> torch.Tensor:
        """The free columns of a ``(B, C N)`` tensor."""
        return nu.flatten()[self.free]

    def expand(self, v: torch.Tensor) -> torch.Tensor:
        """A ``(B, C N)`` tensor with ``v`` on the free columns and 0 elsewhere."""
        return v.new_zeros(self.shape).flatten().index_copy_(0, self.free, v).view(self.shape)

    def dot(self, a, b, a_mu, b_mu) -> torch.Tensor:
        """Per-example inner products ``(B,)``."""
        return a.new_zeros(self.batch).index_add_(0, self.free_image, a * b) + a_mu * b_mu

    def apply(self, v, v_mu):
        r""":math:`(A J A^\top + \delta I)(v, v_\mu)` on the free multipliers."""
        spread = v[self.slot]
        means = spread.new_zeros(self.rows).index_add_(0, self.row, spread) * self.inverse_count
        out = self._to_columns(spread - means[self.row]) + self.column_cost * v_mu[self.free_image] + self.column_damping * v
        out_mu = _image_sums(spread * self.centred_cost, self.entry_image, self.batch) + self.diagonal_mu * v_mu
        return out, torch.where(self.free_mu, out_mu, 0.0)


def _newton_direction(dual, grad_nu, grad_mu, free_nu, free_mu, support, damping, forcing, iterations, interval):
    r"""Preconditioned conjugate gradients for :math:`(A J A^\top + \delta I) d = g` on the free multipliers.

    Batched over examples with per-example step lengths; an example stops
    once its preconditioned residual has shrunk by ``forcing`` (an inexact
    Newton step), the loop once every example has stopped (read every
    ``interval`` iterations) or after ``iterations``. Jacobi-preconditioned.
    """
    tiny = torch.finfo(torch.float64).tiny
    system = _NewtonSystem(dual, support, free_nu, free_mu, damping)
    inverse, inverse_mu = 1 / system.diagonal_nu, torch.where(free_mu, 1 / system.diagonal_mu, 0.0)
    r, r_mu = system.columns(grad_nu), torch.where(free_mu, grad_mu, 0.0)
    d, d_mu = torch.zeros_like(r), torch.zeros_like(r_mu)
    z, z_mu = inverse * r, inverse_mu * r_mu
    p, p_mu = z, z_mu
    rz = system.dot(r, z, r_mu, z_mu)
    target = rz * forcing.square()
    for step in range(iterations):
        moving = rz > target
        if step % interval == 0 and not bool(moving.any()):
            break
        q, q_mu = system.apply(p, p_mu)
        curvature = system.dot(p, q, p_mu, q_mu)
        moving &= curvature > 0
        alpha = torch.where(moving, rz / curvature.clamp_min(tiny), 0.0)
        column_alpha = alpha[system.free_image]
        d, d_mu = d + column_alpha * p, d_mu + alpha * p_mu
        r, r_mu = r - column_alpha * q, r_mu - alpha * q_mu
        z, z_mu = inverse * r, inverse_mu * r_mu
        rz_next = system.dot(r, z, r_mu, z_mu)
        beta = torch.where(moving, rz_next / rz.clamp_min(tiny), 0.0)
        p, p_mu = z + beta[system.free_image] * p, z_mu + beta * p_mu
        rz = torch.where(moving, rz_next, rz)
    return system.expand(d), d_mu


def _per_example(value: torch.Tensor | float, examples: torch.Tensor) -> torch.Tensor | float:
    """``value[examples]`` for a per-example tensor, ``value`` itself for a number."""
    return value[examples] if isinstance(value, torch.Tensor) else value


@dataclass
class _SubState:
    """The dual iterate of some examples: multipliers, plan rows, gradient and value."""

    nu: torch.Tensor
    mu: torch.Tensor
    rows: torch.Tensor
    grad_nu: torch.Tensor
    grad_mu: torch.Tensor
    value: torch.Tensor

    @classmethod
    def gather(cls, examples, on, nu, mu, rows, grad_nu, grad_mu, value) -> _SubState:
        """The examples ``examples`` (their rows ``on``, ``None`` for all) of the batch's iterate."""
        if on is None:
            return cls(nu, mu, rows, grad_nu, grad_mu, value)
        return cls(nu[examples], mu[examples], rows[on], grad_nu[examples], grad_mu[examples], value[examples])

    def scatter(self, examples, on, nu, mu, rows, grad_nu, grad_mu, value) -> None:
        """Write this iterate back into the batch's (in place)."""
        if on is None:
            for whole, part in zip((nu, mu, rows, grad_nu, grad_mu, value), self.fields()):
                if whole is not part:
                    whole.copy_(part)
            return
        nu[examples], mu[examples], grad_nu[examples], grad_mu[examples] = self.nu, self.mu, self.grad_nu, self.grad_mu
        value[examples] = self.value
        rows[on] = self.rows

    def fields(self):
        return self.nu, self.mu, self.rows, self.grad_nu, self.grad_mu, self.value


def _line_search(dual, state: _SubState, support, d_nu, d_mu, live, residual, steps, interval) -> torch.Tensor:
    """Backtracking along the projected path, every example with its own step length; updates ``state`` in place.

    Returns the examples of ``live`` that found no acceptable step. Trials
    after the first run on the dual of the examples still searching (most
    accept the full Newton step). ``support``, the support of ``state``'s
    plan, is the row-wise projections' guess at every trial.
    """
    length = torch.ones_like(state.mu)
    searching = live.clone()
    trial_dual, examples, on = dual, None, None
    for trial_step in range(steps):
        if trial_step > 0 and trial_step % interval == 0:
            examples = torch.nonzero(searching).flatten()
            if examples.numel() == 0:
                break
            trial_dual, on = dual.restrict(examples)
        part = _SubState.gather(examples, on, *state.fields())
        pick = (lambda t: t) if on is None else (lambda t: t[examples])
        trial_nu = (part.nu + pick(length)[:, None] * pick(d_nu)).clamp_min(0)
        trial_mu = (part.mu + pick(length) * pick(d_mu)).clamp_min(0)
        trial_rows, trial_grad_nu, trial_grad_mu, trial_value = trial_dual.evaluate(
            trial_nu, trial_mu, support if on is None else support[on]
        )
        ascent = (part.grad_nu * (trial_nu - part.nu)).sum(1) + part.grad_mu * (trial_mu - part.mu)
        # Near the solution the gain in D is below its rounding: a step that keeps D to rounding and
        # halves the KKT residual is taken then.
        trial_residual = torch.maximum(
            *_natural_residual(trial_nu, trial_mu, trial_grad_nu, trial_grad_mu, trial_dual.budget)
        )
        level = trial_value >= part.value - 1e-12 * part.value.abs().clamp_min(1.0)
        accepted = pick(searching) & (
            (trial_value >= part.value + 1e-4 * ascent) | (level & (trial_residual <= 0.5 * pick(residual)))
        )
        on_rows = accepted[trial_dual.data.image, None]
        updated = _SubState(
            torch.where(accepted[:, None], trial_nu, part.nu),
            torch.where(accepted, trial_mu, part.mu),
            torch.where(on_rows, trial_rows, part.rows),
            torch.where(accepted[:, None], trial_grad_nu, part.grad_nu),
            torch.where(accepted, trial_grad_mu, part.grad_mu),
            torch.where(accepted, trial_value, part.value),
        )
        if on is None:
            state.nu, state.mu, state.rows, state.grad_nu, state.grad_mu, state.value = updated.fields()
            searching &= ~accepted
        else:
            updated.scatter(examples, on, *state.fields())
            searching[examples] &= ~accepted
        length = torch.where(searching, 0.5 * length, length)
        if trial_step % interval == 0 and not bool(searching.any()):
            break
    return searching


def _project_with_box(
    target: torch.Tensor,
    x: torch.Tensor,
    cost: torch.Tensor,
    valid: torch.Tensor,
    budget: torch.Tensor,
    multiplier: torch.Tensor,
    capacity_multiplier: torch.Tensor,
    tol: float,
    box_tol: float,
    box_max_iter: int,
    cg_iterations: int = 50,
    line_search_steps: int = 30,
    damping_scale: torch.Tensor | float = 1.0,
) -> PlanProjection:
    r"""Projection onto the ball of plans intersected with the box, by a semismooth Newton method on the dual.

    Maximizes the dual :math:`D(\nu, \mu)` of :class:`_CapacityDual` over
    :math:`\nu, \mu \ge 0` by projected Newton steps (Bertsekas 1982):
    multipliers at 0 whose gradient points below 0 are held there, the
    others move along the solution of
    :math:`(A J A^\top + \delta I) d = \nabla D` (conjugate gradients,
    Jacobi-preconditioned; :math:`\delta` is the example's KKT residual, a
    Levenberg-Marquardt damping that vanishes at the solution and keeps the
    step finite where the curvature is 0), and a backtracking line search on
    the projected path makes every accepted step increase :math:`D`
    (Armijo). The dual is piecewise quadratic, so once the support and the
    active capacities are identified the Newton step is exact. Warm-started
    from the previous call's multipliers, an attack step typically takes a
    few Newton iterations.

    An example stops when its plan overflows no pixel by more than
    ``box_tol``, every held capacity is slack (complementary slackness to
    ``box_tol``), and the budget's residual is at most ``tol`` relative to
    the budget. The plan is then made exactly feasible by
    :func:`_fit_budget` and :func:`repair_capacity`.
    """
    batch = x.shape[0]
    dual = _CapacityDual.of(target, x, cost, valid, budget)
    nu = capacity_multiplier.reshape(batch, -1).double().clamp_min(0)
    mu = multiplier.double().clamp_min(0)
    rows, grad_nu, grad_mu, value = dual.evaluate(nu, mu)
    iterations = torch.zeros(batch, dtype=torch.int64, device=x.device)
    active = torch.ones(batch, dtype=torch.bool, device=x.device)
    interval = sync_interval(x.device)
    for step in range(box_max_iter + 1):
        column_residual, budget_residual = _natural_residual(nu, mu, grad_nu, grad_mu, dual.budget)
        active &= (column_residual > box_tol) | (budget_residual > tol)
        if step == box_max_iter:
            break
        # Newton steps run on the dual of the active examples alone (refreshed with the host sync every
        # ``interval`` steps; in between, examples that finish stay in it, frozen): late steps often
        # have a few examples left, and the batch's finished ones would cost as much as at the start.
        if step % interval == 0:
            examples = torch.nonzero(active).flatten()
            if examples.numel() == 0:
                break
            sub, on = dual.restrict(examples)
        live = active[examples]
        state = _SubState.gather(examples, on, nu, mu, rows, grad_nu, grad_mu, value)
        residual = torch.maximum(column_residual, budget_residual)[examples]
        free_nu = ((state.nu > 0) | (state.grad_nu > 0)) & live[:, None]
        free_mu = ((state.mu > 0) | (state.grad_mu > 0)) & live
        damping = (1e-2 * residual.clamp_max(1.0) * _per_example(damping_scale, examples)).clamp_min(1e-12)
        # Conjugate-gradient steps cost a small fraction of an evaluation of the dual (see _NewtonSystem):
        # near-exact Newton directions (residual shrunk 1e4-fold) save Newton steps, each a full evaluation.
        forcing = residual.sqrt().clamp(1e-6, 1e-4)
        support = state.rows > 0
        d_nu, d_mu = _newton_direction(
            sub, state.grad_nu, state.grad_mu, free_nu, free_mu, support, damping, forcing, cg_iterations, interval
        )
        iterations[examples] += live.long()
        searching = _line_search(sub, state, support, d_nu, d_mu, live, residual, line_search_steps, interval)
        state.scatter(examples, on, nu, mu, rows, grad_nu, grad_mu, value)
        # No ascent left in the working precision: the example is as solved as it gets.
        active[examples] &= ~searching
    column_residual, budget_residual = _natural_residual(nu, mu, grad_nu, grad_mu, dual.budget)
    converged = (column_residual <= box_tol) & (budget_residual <= tol)
    settled = budget <= 0
    center = target.shape[-1] // 2
    rows = rows.to(target.dtype)
    still = settled[dual.data.image]
    rows[still] = 0
    rows[still, center] = dual.data.mass[still]
    rows = _fit_budget(rows, dual.data, cost, budget)
    rows, fallback = _repair_rows(rows, dual.data, dual.destination, x)
    plan = dual.data.scatter(rows, target.shape)
    capacities = torch.where(settled[:, None], 0.0, nu).to(target.dtype).view(x.shape)
    return PlanProjection(
        plan, torch.where(settled, 0.0, mu).to(target.dtype), iterations, (converged | settled) & ~fallback, capacities
    )


def _destinations(data: _Rows, x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Flat pixel (over ``B C H W``) each entry of the massive rows moves to; ``B C H W`` (a sink) when invalid."""
    dr, ds = _offsets(kernel_size, x.device)
    # Inside the image the window's offsets are fixed flat steps dr W + ds; the invalid ones go to the sink.
    return torch.where(data.valid, data.index[:, None] + (dr * x.shape[-1] + ds), x.numel())


def _repair_rows(
    rows: torch.Tensor, data: _Rows, destination: torch.Tensor, x: torch.Tensor, rounds: int = 50
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Make the massive rows of a plan of the ball satisfy :math:`P^\top \mathbf 1 \le 1` without leaving the ball.

    Each round scales down the entries arriving at every over-full pixel
    ``j`` from *other* pixels so that ``j`` holds 1, less a few units in the
    last place against rounding (its own kept mass is at most
    ``x_j <= 1``), and gives the removed mass back to its
    source pixel's offset ``(0, 0)``. Row sums are unchanged, entries stay
    non-negative and the cost can only drop, so the plan stays in the ball;
    a source that overflows in turn is handled in the next round (the
    overflow only shrinks: what comes back is what was removed).

    If overflow remains after ``rounds`` rounds, the plan is mixed with the
    identity plan, :math:`P \leftarrow \theta P + (1 - \theta) D`, with the
    largest :math:`\theta` that fits (``x <= 1`` makes :math:`\theta = 0`
    always fit), and the example is reported as repaired by fallback.

    Returns
    -------
    rows : Tensor (R, K)
    fallback : Tensor (B,), bool
    """
    batch, total = x.shape[0], x.numel()
    center = rows.shape[1] // 2
    tiny = torch.finfo(rows.dtype).tiny
    headroom = 1 - 4 * torch.finfo(rows.dtype).eps  # aim a little below 1 so rounding cannot overshoot

    def filled_by(rows):
        return rows.new_zeros(total + 1).index_add_(0, destination.flatten(), rows.flatten())[:-1]

    for _ in range(rounds):
        filled = filled_by(rows)
        over = filled > 1
        if not bool(over.any()):
            break
        kept = rows.new_zeros(total).index_copy_(0, data.index, rows[:, center])
        keep = ((headroom - kept) / (filled - kept).clamp_min(tiny)).clamp(0, 1)
        keep = torch.cat([torch.where(over, keep, 1.0), keep.new_ones(1)])
        keep_entry = keep.index_select(0, destination.flatten()).view(rows.shape)
        keep_entry[:, center] = 1
        removed = (rows * (1 - keep_entry)).sum(-1)
        rows = rows * keep_entry
        rows[:, center] += removed
    filled = filled_by(rows).view(batch, -1)
    over = filled > 1 + 4 * torch.finfo(rows.dtype).eps
    fallback = over.any(1)
    if bool(fallback.any()):
        # theta (z_j - x_j) <= 1 - x_j at every over-full pixel; x_j <= 1 keeps theta >= 0.
        centres = x.reshape(batch, -1)
        room = ((headroom - centres) / (filled - centres).clamp_min(tiny)).clamp(0, 1)
        theta = torch.where(over, room, 1.0).amin(1)[data.image]
        rows = theta[:, None] * rows
        rows[:, center] += (1 - theta) * data.mass
    return rows, fallback


def repair_capacity(plan: torch.Tensor, x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Move plans of the ball into the box :math:`P^\top \mathbf 1 \le 1` without leaving the ball.

    Mass arriving at an over-full pixel from other pixels goes back to its
    source's offset ``(0, 0)``: row sums stay :math:`x`, entries stay
    :math:`\ge 0` and the cost can only drop (the rounds and the fallback are
    those of :func:`_repair_rows`).

    Parameters
    ----------
    plan : Tensor (B, C, N, K)
        Plans of the ball around ``x`` (rows summing to ``x``, within budget).
    x : Tensor (B, C, H, W)
        Centres, ``0 <= x <= 1``.
    valid : Tensor (N, K), bool
        Which offsets stay inside the image (:func:`window_layout`).

    Returns
    -------
    plan : Tensor (B, C, N, K)
        The repaired plans.
    fallback : Tensor (B,), bool
        Where the rounds left overflow and the plan was mixed with the identity plan.
    """
    data = _Rows.of(x, valid)
    rows = plan.reshape(-1, plan.shape[-1])[data.index]
    rows, fallback = _repair_rows(rows, data, _destinations(data, x, math.isqrt(plan.shape[-1])), x)
    return data.scatter(rows, plan.shape), fallback


@torch.no_grad()
def project_plans(
    target: torch.Tensor,
    x: torch.Tensor,
    cost: torch.Tensor,
    valid: torch.Tensor,
    eps,
    *,
    multiplier: torch.Tensor | None = None,
    capacity_multiplier: torch.Tensor | None = None,
    box: bool = False,
    tol: float = 1e-6,
    max_iter: int = 100,
    box_tol: float = 1e-6,
    box_max_iter: int = 100,
) -> PlanProjection:
    r"""Euclidean projection of plans onto the ball of plans (optionally with the box).

    Solves, for each example,

    .. math::

        \min_P \tfrac12 \|P - T\|_2^2 \quad\text{s.t.}\quad P \ge 0,\;
        P = 0 \text{ off valid},\; P\mathbf 1 = x,\;
        \langle c, P\rangle \le \varepsilon\, m(x)
        \quad [,\; P^\top \mathbf 1 \le 1 \text{ if box}].

    **Without the box (exact).** The KKT conditions give
    :math:`P(\mu) = \Pi_\Delta(T - \mu c)`, the row-wise projection onto the
    scaled simplices :math:`\{p \ge 0, \sum p = x_i\}`, for the multiplier
    :math:`\mu \ge 0` of the budget: :math:`\mu = 0` if :math:`P(0)` is
    within the budget, otherwise the root of
    :math:`\phi(\mu) = \langle c, P(\mu)\rangle = \varepsilon m(x)`.
    :math:`\phi` is continuous, non-increasing and piecewise linear; on the
    piece through :math:`\mu` its slope is
    :math:`-\sum_i \sum_{o \in S_i} (c_o - \bar c_{S_i})^2` with
    :math:`S_i` the support of row ``i``. The root is found by Newton's
    method on that slope, safeguarded by a bracket
    :math:`[\mu_-, \mu_+]` (bisection whenever a Newton step leaves it),
    starting at ``multiplier`` (warm start) or 0; the bracket's upper end
    starts at the :math:`\mu` beyond which every row keeps all its mass in
    place. Once the iterate is on the root's linear piece, Newton's step is
    exact. An example stops when :math:`|\phi(\mu) - \varepsilon m(x)| \le
    \texttt{tol}\cdot \varepsilon m(x)`, or when :math:`\mu` can no longer
    move in the working precision; out of iterations it returns
    :math:`P(\mu_+)`, which is feasible. A plan that overspends by rounding
    is mixed with the identity plan (zero cost) by the smallest amount that
    restores the budget, so the result always satisfies it.

    **With the box (exact).** The capacities :math:`P^\top \mathbf 1 \le 1`
    get multipliers :math:`\nu \ge 0` beside :math:`\mu`; for fixed
    multipliers the plan is again a row-wise simplex projection, of
    :math:`T - \mu c - \nu_{\text{dest}}`, and the multipliers maximize the
    concave, piecewise quadratic dual, found by a projected semismooth Newton
    method (conjugate-gradient inner solves, Armijo line search; see
    :func:`_project_with_box`) warm-started from ``multiplier`` and
    ``capacity_multiplier``. It stops at a KKT residual of ``box_tol``
    (capacities, mass units) and ``tol`` (budget, relative); the plan is
    then made exactly feasible by moving the remaining overflow back to the
    sources (a plan-level repair that keeps rows and budget), falling back on
    a mix with the identity plan only if that fails (reported as not
    converged). Computed in float64 whatever the input's dtype, so the
    residuals can reach ``1e-6`` and below on float32 problems.

    Parameters
    ----------
    target : Tensor (B, C, N, K)
        Plans to project (any finite values).
    x : Tensor (B, C, H, W)
        Centres, ``>= 0`` (and ``<= 1`` with ``box``); ``N = H W``.
    cost : Tensor (K,)
        Cost per offset, from :func:`window_layout`.
    valid : Tensor (N, K), bool
        Offsets inside the image, from :func:`window_layout`.
    eps : float or Tensor (B,)
        Radii, ``>= 0``, in normalized units.
    multiplier : Tensor (B,), optional
        Initial budget multipliers (e.g. from the previous attack step).
    capacity_multiplier : Tensor (B, C, H, W), optional
        With ``box``: initial capacity multipliers (e.g. from the previous
        attack step); default 0.
    box : bool, default False
        Also require :math:`P^\top \mathbf 1 \le 1`.
    tol : float, default 1e-6
        Relative budget gap at which the multiplier search stops.
    max_iter : int, default 100
        Multiplier evaluations per example (per projection onto the ball).
    box_tol : float, default 1e-6
        With ``box``: KKT residual of the capacities at which the Newton
        method stops (max-abs pixel overflow and complementary slackness,
        mass units).
    box_max_iter : int, default 100
        With ``box``: Newton iterations per example.

    Returns
    -------
    PlanProjection
        Rows of the plan sum to ``x`` (to rounding), entries are ``>= 0``
        and exactly 0 off ``valid`` and on pixels with ``x_i = 0``, the cost
        is within the budget; ``eps = 0`` or ``m(x) = 0`` gives the identity
        plan.
    """
    _check_plan_problem("target", target, x, cost, valid)
    if not isinstance(box, bool):
        raise ValueError(f"box={box!r} is invalid: it must be True or False")
    tol = check_positive("tol", tol, upper=1.0, upper_open=True)
    max_iter = check_iterations("max_iter", max_iter)
    box_tol = check_positive("box_tol", box_tol, upper=1.0, upper_open=True)
    box_max_iter = check_iterations("box_max_iter", box_max_iter)
    batch = x.shape[0]
    budget = check_nonnegative_eps(eps, batch, x) * x.flatten(1).sum(1)
    if multiplier is None:
        multiplier = x.new_zeros(batch)
    elif (
        not isinstance(multiplier, torch.Tensor)
        or multiplier.shape != (batch,)
        or not bool(torch.isfinite(multiplier).all())
    ):
        described = tuple(multiplier.shape) if isinstance(multiplier, torch.Tensor) else type(multiplier).__name__
        raise ValueError(f"multiplier must be a finite tensor of shape ({batch},), got {described}")
    multiplier = multiplier.to(dtype=x.dtype, device=x.device).clamp_min(0)
    cost, valid = cost.to(dtype=x.dtype, device=x.device), valid.to(x.device)
    if box:
        _check_box_centres(x)
        if capacity_multiplier is None:
            capacity_multiplier = torch.zeros_like(x)
        elif (
            not isinstance(capacity_multiplier, torch.Tensor)
            or capacity_multiplier.shape != x.shape
            or not bool(torch.isfinite(capacity_multiplier).all())
        ):
            described = (
                tuple(capacity_multiplier.shape)
                if isinstance(capacity_multiplier, torch.Tensor)
                else type(capacity_multiplier).__name__
            )
            raise ValueError(f"capacity_multiplier must be a finite tensor of the images' shape {tuple(x.shape)}, got {described}")
        capacity_multiplier = capacity_multiplier.to(dtype=x.dtype, device=x.device)
        return _project_with_box(target, x, cost, valid, budget, multiplier, capacity_multiplier, tol, box_tol, box_max_iter)
    return _project_ball(target, x, cost, valid, budget, multiplier, tol, max_iter)


# --------------------------------------------------------------------------
# Linear maximization oracle
# --------------------------------------------------------------------------


@dataclass
class PlanMaximization:
    r"""Result of :func:`plan_linear_maximization`; every field has the batch first.

    Attributes
    ----------
    plan : Tensor (B, C, N, K)
        A maximizer, in the ball of plans.
    value : Tensor (B,)
        :math:`\\langle G, P\\rangle` of that plan.
    multiplier : Tensor (B,)
        The optimal budget multiplier :math:`\\mu^\\star` (0 when the budget is slack).
    iterations : Tensor (B,), int64
        Greedy-plan evaluations; with the box, Newton iterations of the
        projections.
    converged : Tensor (B,), bool
        The duality gap was certified below the tolerance.
    capacity_multiplier : Tensor (B, C, H, W) or None
        With the box: the pixel capacities' multipliers of the certificate,
        in the units of ``gradient`` (pass them back to warm-start).
    """

    plan: torch.Tensor
    value: torch.Tensor
    multiplier: torch.Tensor
    iterations: torch.Tensor
    converged: torch.Tensor
    capacity_multiplier: torch.Tensor | None = None


@torch.no_grad()
def plan_linear_maximization(
    gradient: torch.Tensor,
    x: torch.Tensor,
    cost: torch.Tensor,
    valid: torch.Tensor,
    eps,
    *,
    tol: float | None = None,
    max_iter: int = 100,
    box: bool = False,
    start: torch.Tensor | None = None,
    capacity_multiplier: torch.Tensor | None = None,
    box_max_iter: int = 100,
) -> PlanMaximization:
    r"""Exact linear maximization over the ball of plans (Frank-Wolfe's oracle).

    Solves the LP :math:`\max \langle G, P\rangle` over
    :math:`P \ge 0` local, :math:`P\mathbf 1 = x`,
    :math:`\langle c, P\rangle \le b = \varepsilon m(x)` by its Lagrangian
    dual in the budget multiplier alone:

    .. math::

        D(\mu) = \sum_i x_i \max_o (G_{io} - \mu c_o) + \mu b, \qquad
        \min_{\mu \ge 0} D(\mu).

    For a fixed :math:`\mu` each row puts all its mass on an offset of
    :math:`\arg\max_o (G_{io} - \mu c_o)` (the *greedy plan*
    :math:`S(\mu)`, ties broken towards the cheaper offset); its cost
    :math:`C(\mu)` is a non-increasing step function and :math:`b - C(\mu)`
    is a slope of the convex, piecewise linear :math:`D`. If
    :math:`C(0) \le b`, :math:`S(0)` is optimal. Otherwise the search keeps
    :math:`\mu_-` with :math:`C(\mu_-) > b` and :math:`\mu_+` with
    :math:`C(\mu_+) \le b` (at first 0 and the multiplier beyond which every
    row stays in place) and evaluates the point where the supporting lines
    of :math:`D` at both ends cross,

    .. math::

        \mu_c = \frac{V(\mu_-) - V(\mu_+)}{C(\mu_-) - C(\mu_+)},
        \qquad V(\mu) = \langle G, S(\mu)\rangle

    (the value gained per unit of cost between the two greedy plans; a
    cutting-plane step, finite on a piecewise linear function). If
    :math:`D(\mu_c)` equals the lines' value there, :math:`\mu_c` minimizes
    :math:`D` and both greedy plans are optimal for the Lagrangian at
    :math:`\mu_c`; their mix :math:`\theta S(\mu_-) + (1 - \theta) S(\mu_+)`
    with :math:`\theta = (b - C(\mu_+)) / (C(\mu_-) - C(\mu_+))` spends
    exactly :math:`b` (only the rows whose argmax differs are split) and is
    optimal by strong duality. Otherwise :math:`\mu_c` replaces the end of
    the bracket on its side. For any bracket the mix is feasible and its
    value is within :math:`D(\mu_c) - \text{line}(\mu_c)` of the optimum,
    the certificate tested against ``tol``.

    The gradient is scaled per example to max-abs 1 (the maximizer does not
    change); the returned multiplier is in the original units.

    **With the box** (:math:`P^\top \mathbf 1 \le 1`) the LP is a
    transportation problem with capacities and one side constraint. It is
    solved by the proximal point method on the exact boxed projection of
    :func:`project_plans`,

    .. math::

        P_{t+1} = \Pi\big(P_t + s_t G\big), \qquad s_{t+1} = 8\, s_t,
        \quad s_0 = 1,

    which on a polytope reaches an exact maximizer after finitely many
    steps, starting from ``start`` (a feasible plan, e.g. the current
    Frank-Wolfe iterate; default the identity plan). Each projection's
    multipliers :math:`(\mu, \nu)/s_t` are dual feasible for the LP, so

    .. math::

        U = \sum_i x_i \max_o \big(G_{io} - (\mu c_o + \nu_{\text{dest}(i,o)})/s_t\big)
            + (\mu b + \textstyle\sum_j \nu_j)/s_t

    bounds the optimum from above and :math:`U - \langle G, P_{t+1}\rangle`
    certifies the plan; an example stops when that gap is at most ``tol``.

    Parameters
    ----------
    gradient : Tensor (B, C, N, K)
        Linear functional on plans, e.g. ``plan_gradient(g, k)``.
    x, cost, valid, eps
        As in :func:`project_plans`.
    tol : float, optional
        Certified duality gap, relative to :math:`m(x) \max |G|`; default
        ``32 * finfo(dtype).eps`` (with the box, ``1e-6``).
    max_iter : int, default 100
        Greedy-plan evaluations per example; with the box, proximal steps.
    box : bool, default False
        Also require :math:`P^\top \mathbf 1 \le 1` (centres ``<= 1``).
    start : Tensor (B, C, N, K), optional
        With the box: a feasible plan to start the proximal steps from.
    capacity_multiplier : Tensor (B, C, H, W), optional
        With the box: the previous call's capacity multipliers (warm start).
    box_max_iter : int, default 100
        With the box: Newton iterations of each projection.

    Returns
    -------
    PlanMaximization
    """
    _check_plan_problem("gradient", gradient, x, cost, valid)
    max_iter = check_iterations("max_iter", max_iter)
    dtype, device = gradient.dtype, gradient.device
    if not isinstance(box, bool):
        raise ValueError(f"box={box!r} is invalid: it must be True or False")
    if box:
        _check_box_centres(x)
        tol = 1e-6 if tol is None else check_positive("tol", tol, upper=1.0, upper_open=True)
        if start is None:
            start = identity_plan(x, _kernel_size_of(gradient))
        else:
            _check_plan_problem("start", start, x, cost, valid)
        if capacity_multiplier is None:
            capacity_multiplier = torch.zeros_like(x)
        elif not isinstance(capacity_multiplier, torch.Tensor) or capacity_multiplier.shape != x.shape:
            raise ValueError(f"capacity_multiplier must be a tensor of the images' shape {tuple(x.shape)}")
        budget = check_nonnegative_eps(eps, x.shape[0], x) * x.flatten(1).sum(1)
        return _maximize_with_box(
            gradient, x, cost.to(dtype=dtype, device=device), valid.to(device), budget, start,
            capacity_multiplier.to(dtype=dtype, device=device), tol, max_iter, check_iterations("box_max_iter", box_max_iter),
        )
    tol = 32 * torch.finfo(dtype).eps if tol is None else check_positive("tol", tol, upper=1.0, upper_open=True)
    batch, k2 = gradient.shape[0], gradient.shape[-1]
    cost, valid = cost.to(dtype=dtype, device=device), valid.to(device)
    budget = (check_nonnegative_eps(eps, batch, x) * x.flatten(1).sum(1)).double()
    data = _Rows.of(x, valid)
    # Offsets by increasing cost: argmax returns the first maximum, so ties go to the cheaper offset.
    order = torch.sort(cost, stable=True).indices
    ordered_cost = cost[order]
    values = gradient.reshape(-1, k2)[data.index][:, order]
    ordered_valid = data.valid[:, order]
    scale = torch.zeros(batch, dtype=dtype, device=device).scatter_reduce_(
        0, data.image, values.masked_fill(~ordered_valid, 0).abs().amax(-1), "amax", include_self=True
    )
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    values = (values / scale[data.image, None]).masked_fill(~ordered_valid, -math.inf)
    mass64 = data.mass.double()

    def greedy(mu: torch.Tensor):
        """Offsets, value and cost of the greedy plans at per-example multipliers ``mu`` (B,)."""
        choice = (values - mu.to(dtype)[data.image, None] * ordered_cost).argmax(-1)
        gained = values.gather(1, choice[:, None])[:, 0].double() * mass64
        spent = ordered_cost[choice].double() * mass64
        return choice, _image_sums(gained, data.image, batch), _image_sums(spent, data.image, batch)

    zero = torch.zeros(batch, dtype=torch.float64, device=device)
    choice_low, value_low, cost_low = greedy(zero)
    iterations = torch.ones(batch, dtype=torch.int64, device=device)
    slack = cost_low <= budget
    settled = budget <= 0  # nothing may move: the identity plan (offset (0, 0) is the only free one)
    done = slack | settled
    ceiling = ((values - values[:, :1]) / ordered_cost.clamp_min(1e-30)).masked_fill(~ordered_valid, -math.inf)
    ceiling[:, 0] = 0.0
    upper = torch.zeros(batch, dtype=dtype, device=device).scatter_reduce_(
        0, data.image, ceiling.amax(-1), "amax", include_self=True
    ).double() * (1 + 2.0**-10)
    choice_high, value_high, cost_high = greedy(torch.where(done, zero, upper))
    iterations += (~done).long()
    # With a slack budget the unconstrained greedy plan is the answer: both ends hold it.
    choice_high = torch.where(slack[data.image], choice_low, choice_high)
    value_high, cost_high = torch.where(slack, value_low, value_high), torch.where(slack, cost_low, cost_high)
    lower = zero.clone()
    upper = torch.where(slack, zero, upper)
    converged = done.clone()
    mass = x.flatten(1).sum(1).double()
    gap_tol = tol * mass

    for _ in range(max_iter):
        searching = ~converged & (iterations < max_iter)
        if not bool(searching.any()):
            break
        crossing = (value_low - value_high) / (cost_low - cost_high).clamp_min(torch.finfo(torch.float64).tiny)
        inside = (crossing > lower) & (crossing < upper)
        # Rounding can put the crossing on an end: the bracket is then as tight as it gets.
        converged |= searching & ~inside
        searching &= inside
        if not bool(searching.any()):
            break
        mu = torch.where(searching, crossing, upper)
        choice, value, spent = greedy(mu)
        iterations += searching.long()
        dual = value + mu * (budget - spent)
        line = value_low + mu * (budget - cost_low)
        optimal = searching & (dual - line <= gap_tol)
        converged |= optimal
        move_low = searching & ~optimal & (spent > budget)
        move_high = searching & ~optimal & ~(spent > budget)
        lower = torch.where(move_low, mu, lower)
        value_low, cost_low = torch.where(move_low, value, value_low), torch.where(move_low, spent, cost_low)
        choice_low = torch.where(move_low[data.image], choice, choice_low)
        upper = torch.where(move_high | optimal, mu, upper)
        # At an optimal crossing the upper end's plan stays: it is also optimal there.
        value_high, cost_high = torch.where(move_high, value, value_high), torch.where(move_high, spent, cost_high)
        choice_high = torch.where(move_high[data.image], choice, choice_high)

    theta = ((budget - cost_high) / (cost_low - cost_high).clamp_min(torch.finfo(torch.float64).tiny)).clamp(0, 1)
    theta = torch.where(slack, 0.0, theta)
    row_theta = theta[data.image]
    rows = values.new_zeros(values.shape)
    center = 0  # offset (0, 0) comes first in cost order
    choice_low = torch.where(settled[data.image], center, choice_low)
    choice_high = torch.where(settled[data.image], center, choice_high)
    rows.scatter_add_(1, choice_low[:, None], (row_theta * mass64).to(dtype)[:, None])
    rows.scatter_add_(1, choice_high[:, None], ((1 - row_theta) * mass64).to(dtype)[:, None])
    unordered = torch.empty_like(rows)
    unordered[:, order] = rows
    unordered = _fit_budget(unordered, data, cost, budget.to(dtype))
    plan = data.scatter(unordered, gradient.shape)
    value = (plan * gradient).flatten(1).sum(1, dtype=torch.float64).to(dtype)
    multiplier = torch.where(slack | settled, 0.0, upper) * scale.double()
    return PlanMaximization(plan, value, multiplier.to(dtype), iterations, converged | settled)


def _maximize_with_box(gradient, x, cost, valid, budget, start, capacity_multiplier, tol, max_iter, box_max_iter):
    """:func:`plan_linear_maximization` with the box, on validated inputs: proximal steps on the boxed projection."""
    batch = x.shape[0]
    data = _Rows.of(x, valid)
    rows = gradient.reshape(-1, gradient.shape[-1])[data.index].double()
    scale = torch.zeros(batch, dtype=torch.float64, device=x.device).scatter_reduce_(
        0, data.image, (rows * data.valid).abs().amax(-1), "amax", include_self=True
    )
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    unit = (gradient.double() / scale.view(-1, 1, 1, 1)).masked_fill(~valid, 0.0)
    unit_rows = rows / scale[data.image, None]
    mass = x.flatten(1).sum(1).double()
    destination = _destinations(data, x, _kernel_size_of(gradient))
    cost64 = cost.double()

    def certified_gap(plan, mu, nu):
        """Upper bound minus value of ``plan``, both in the units of ``unit``; ``(mu, nu)`` in LP units."""
        value = (plan.double() * unit).flatten(1).sum(1)
        padded = torch.cat([nu.reshape(-1).double(), nu.new_zeros(1, dtype=torch.float64)])
        reduced = (unit_rows - mu.double()[data.image, None] * cost64 - padded[destination]).masked_fill(~data.valid, -math.inf)
        best = _image_sums(data.mass.double() * reduced.amax(-1), data.image, batch)
        bound = best + mu.double() * budget.double() + nu.double().flatten(1).sum(1)
        return bound - value, value

    plan = start
    # The previous call's multipliers are in the gradient's units; the proximal problem wants them times s / scale.
    mu = x.new_zeros(batch)
    nu = (capacity_multiplier.double() / scale.view(-1, 1, 1, 1)).to(x.dtype)
    step = torch.ones(batch, dtype=torch.float64, device=x.device)
    iterations = torch.zeros(batch, dtype=torch.int64, device=x.device)
    gap, value = certified_gap(plan, mu, nu)
    converged = gap <= tol * mass
    interval = sync_interval(x.device)
    for round_ in range(max_iter):
        if round_ % interval == 0 and bool(converged.all()):
            break
        target = (plan.double() + step.view(-1, 1, 1, 1) * unit).to(x.dtype)
        projection = _project_with_box(
            target, x, cost, valid, budget, (mu * step).to(x.dtype), (nu * step.view(-1, 1, 1, 1)).to(x.dtype),
            1e-9, 1e-9, box_max_iter, damping_scale=1 / step,
        )
        iterations += (~converged).long()
        mu_now = (projection.multiplier.double() / step).to(x.dtype)
        nu_now = (projection.capacity_multiplier.double() / step.view(-1, 1, 1, 1)).to(x.dtype)
        gap_now, value_now = certified_gap(projection.plan, mu_now, nu_now)
        moving = ~converged
        plan = torch.where(moving.view(-1, 1, 1, 1), projection.plan, plan)
        mu, nu = torch.where(moving, mu_now, mu), torch.where(moving.view(-1, 1, 1, 1), nu_now, nu)
        gap, value = torch.where(moving, gap_now, gap), torch.where(moving, value_now, value)
        converged |= gap <= tol * mass
        step = torch.where(converged, step, 8 * step)
    return PlanMaximization(
        plan,
        (value * scale).to(x.dtype),
        (mu.double() * scale).to(x.dtype),
        iterations,
        converged,
        (nu.double() * scale.view(-1, 1, 1, 1)).to(x.dtype),
    )


# --------------------------------------------------------------------------
# The attacks
# --------------------------------------------------------------------------


class _PlanGeometry:
    """Transport, and the layout of each image size met so far (cached: it is rebuilt often otherwise)."""

    def __init__(self, kernel_size: int, p: float):
        self.transport = LocalTransport(kernel_size, p)
        self._layouts: dict = {}

    def layout(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (x.shape[-2], x.shape[-1], x.dtype, x.device)
        if key not in self._layouts:
            self._layouts[key] = window_layout(self.transport, x.shape[-2], x.shape[-1], x.dtype, x.device)
        return self._layouts[key]

    def image(self, plan: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return plan_image(plan, x.shape[-2], x.shape[-1])


def _check_centres(x: torch.Tensor) -> None:
    check_images(x, x)


def _checked_gradient(state: IterateState, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient with non-finite examples zeroed, and the mask of those examples (they fail)."""
    if not isinstance(grad, torch.Tensor) or grad.shape != state.center.shape:
        raise ValueError(
            f"grad has shape {tuple(getattr(grad, 'shape', ()))}: it must match the images, {tuple(state.center.shape)}"
        )
    failed = ~torch.isfinite(grad).flatten(1).all(1)
    if bool(failed.any()):
        grad = torch.where(failed.view(-1, 1, 1, 1), torch.zeros_like(grad), grad)
    return grad, failed


def _random_plan(x: torch.Tensor, valid: torch.Tensor, cost: torch.Tensor, budget: torch.Tensor, generator) -> torch.Tensor:
    r"""A random plan of the ball.

    Rows uniformly random on their scaled simplices (Dirichlet(1) on the
    valid offsets), mixed with the identity plan to fit the budget.
    """
    batch, channels, height, width = x.shape
    k2 = valid.shape[-1]
    draws = torch.rand((batch, channels, height * width, k2), generator=generator, dtype=x.dtype, device="cpu").to(x.device)
    weights = (-torch.log1p(-draws)).masked_fill(~valid, 0.0)
    rows = weights / weights.sum(-1, keepdim=True) * x.reshape(batch, channels, -1, 1)
    spent = plan_cost(rows, cost)
    theta = torch.where(spent > budget, budget / spent.clamp_min(torch.finfo(x.dtype).tiny), torch.ones_like(spent))
    theta = theta.view(batch, 1, 1, 1)
    return theta * rows + (1 - theta) * identity_plan(x, math.isqrt(k2))


class PlanPGDIterate:
    r"""Projected gradient ascent on transport plans (Wu, Wang and Yu 2020).

    The iterate is a plan :math:`P` of the ball of plans around the clean
    image, kept in ``state.extra["plan"]``; the model sees its column sums.
    A step moves the plan along the loss gradient in plan space,
    :math:`G = \texttt{plan\_gradient}(g)` (the image gradient at each
    entry's destination), and projects back exactly with
    :func:`project_plans`, warm-started from the previous step's budget
    multiplier (``state.extra["multiplier"]``):

    .. math:: P \leftarrow \Pi\big(P + \alpha\, d(G)\big).

    Step rules :math:`d`, in units of pixel mass (images in [0, 1]):

    * ``"linf_normalized"`` (default): :math:`d = G / \max |G|` per example,
      Wu et al.'s rule (their ``lr`` is :math:`\alpha`: 0.1 on MNIST, 0.01 on
      CIFAR-10); every entry moves by at most :math:`\alpha`.
    * ``"sign"``: :math:`d = \operatorname{sign}(G)`.

    Parameters
    ----------
    kernel_size, p
        Local transport window and cost exponent (see :class:`LocalTransport`).
    step_size : float, default 0.1
        :math:`\alpha > 0`.
    step_rule : {"linf_normalized", "sign"}
    box : bool, default False
        Keep pixels <= 1 inside the projection (see :func:`project_plans`).
    tol, max_iter, box_tol, box_max_iter
        Passed to :func:`project_plans`.
    """

    STEP_RULES = ("linf_normalized", "sign")

    def __init__(
        self,
        kernel_size: int = 5,
        p: float = 2.0,
        step_size: float = 0.1,
        step_rule: str = "linf_normalized",
        box: bool = False,
        tol: float = 1e-6,
        max_iter: int = 100,
        box_tol: float = 1e-6,
        box_max_iter: int = 100,
    ):
        self.geometry = _PlanGeometry(kernel_size, p)
        self.transport = self.geometry.transport
        self.step_size = check_positive("step_size", step_size)
        if step_rule not in self.STEP_RULES:
            raise ValueError(f"step_rule={step_rule!r} is invalid: allowed {list(self.STEP_RULES)}")
        self.step_rule = step_rule
        if not isinstance(box, bool):
            raise ValueError(f"box={box!r} is invalid: it must be True or False")
        self.box = box
        self.tol = check_positive("tol", tol, upper=1.0, upper_open=True)
        self.max_iter = check_iterations("max_iter", max_iter)
        self.box_tol = check_positive("box_tol", box_tol, upper=1.0, upper_open=True)
        self.box_max_iter = check_iterations("box_max_iter", box_max_iter)

    def __repr__(self) -> str:
        t = self.transport
        return (
            f"PlanPGDIterate(kernel_size={t.kernel_size}, p={t.p}, step_size={self.step_size}, "
            f"step_rule={self.step_rule!r}, box={self.box})"
        )

    def _project(self, target, x, eps, extra) -> PlanProjection:
        cost, valid = self.geometry.layout(x)
        return project_plans(
            target, x, cost, valid, eps, multiplier=extra["multiplier"],
            capacity_multiplier=extra.get("capacity_multiplier"), box=self.box, tol=self.tol,
            max_iter=self.max_iter, box_tol=self.box_tol, box_max_iter=self.box_max_iter,
        )

    def _carried(self, projection: PlanProjection) -> dict[str, torch.Tensor]:
        """The multipliers that warm-start the next step's projection."""
        carried = {"multiplier": projection.multiplier}
        if self.box:
            carried["capacity_multiplier"] = projection.capacity_multiplier
        return carried

    def _cold_multipliers(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_centres(x)
        if self.box:
            _check_box_centres(x)
        carried = {"multiplier": x.new_zeros(x.shape[0])}
        if self.box:
            carried["capacity_multiplier"] = torch.zeros_like(x)
        return carried

    def start_at(self, x: torch.Tensor, plan: torch.Tensor) -> IterateState:
        """The iterate at the plans ``plan`` ``(B, C, H W, k^2)``, which the caller keeps inside the ball
        (e.g. a verified example's exact plan, scaled towards the identity plan)."""
        carried = self._cold_multipliers(x)
        plan = plan.to(x)
        return IterateState(x, self.geometry.image(plan, x), {"plan": plan, **carried})

    def start(self, x, eps, generator=None):
        carried = self._cold_multipliers(x)
        k = self.transport.kernel_size
        if generator is None:
            plan = identity_plan(x, k)
        else:
            cost, valid = self.geometry.layout(x)
            budget = check_nonnegative_eps(eps, x.shape[0], x) * x.flatten(1).sum(1)
            plan = _random_plan(x, valid, cost, budget, generator)
            if self.box:
                projection = self._project(plan, x, eps, carried)
                plan, carried = projection.plan, self._carried(projection)
        return IterateState(x, self.geometry.image(plan, x), {"plan": plan, **carried})

    def _direction(self, grad: torch.Tensor) -> torch.Tensor:
        if self.step_rule == "sign":
            return grad.sign()
        # Every pixel is some entry's destination (its own offset (0, 0)), so max |G| = max |g|.
        norm = grad.flatten(1).abs().amax(1).view(-1, 1, 1, 1)
        return grad / norm.clamp_min(torch.finfo(grad.dtype).tiny)

    def step(self, state, grad, eps, iteration):
        grad, failed = _checked_gradient(state, grad)
        x = state.center
        direction = plan_gradient(self._direction(grad), self.transport.kernel_size)
        target = torch.add(state.extra["plan"], direction, alpha=self.step_size)  # one pass over the strided direction
        projection = self._project(target, x, eps, state.extra)
        plan = projection.plan
        if bool(failed.any()):  # a plan-sized identity and select only when some gradient failed
            plan = torch.where(failed.view(-1, 1, 1, 1), identity_plan(x, self.transport.kernel_size), plan)
        report = StepReport(
            converged=projection.converged & ~failed,
            solver_iterations=projection.iterations,
            zero_gradient=is_zero_gradient(grad) & ~failed,
            failed=failed,
        )
        extra = dict(state.extra, plan=plan, **self._carried(projection))
        return IterateState(x, self.geometry.image(plan, x), extra), report


class FrankWolfeIterate:
    r"""Frank-Wolfe on transport plans with an exact oracle (Wu, Wang and Yu 2020).

    Each step solves the linear maximization
    :math:`S = \arg\max_{P \in \mathcal{P}_\varepsilon(x)} \langle G, P\rangle`
    of the plan-space gradient exactly (:func:`plan_linear_maximization`)
    and moves towards it,

    .. math:: P \leftarrow P + \gamma_s (S - P), \qquad \gamma_s = \frac{2}{s + 2},

    where ``s`` counts the steps taken at the current radius: the attack's
    schedule grows the radius every few steps, and each growth restarts the
    step sizes (``s = 0`` jumps to ``S``), since the classical schedule
    :math:`2/(t+2)` of a fixed polytope would leave too little step to use
    the new budget. A convex combination of plans of the ball stays in the
    ball, and a growing radius only enlarges it. If a radius shrinks below
    the plan's cost, the plan is first mixed with the identity plan to fit.

    **Box.** With ``box=True`` every image the model sees has pixels <= 1,
    in one of two ways:

    * ``box_oracle=False`` (default): the Frank-Wolfe plan runs on the ball
      without the box, where the oracle is exact and cheap, and the model
      sees the image of its exact projection onto the ball *with* the box
      (:func:`project_plans`, warm-started from the previous step's
      multipliers); Wu et al. apply the same projection once, after the last
      step.
    * ``box_oracle=True``: the oracle maximizes over the boxed set itself (a
      transportation problem with capacities, solved exactly by proximal
      steps on the boxed projection, warm-started from the current plan and
      the previous step's capacity multipliers), so the iterate stays in the
      boxed set and is what the model sees. Frank-Wolfe proper on the real
      feasible set, and several projections per step, so slower.

    Parameters
    ----------
    kernel_size, p
        Local transport window and cost exponent.
    box : bool, default False
        Keep pixels <= 1 (see above).
    box_oracle : bool, default False
        With the box: run the oracle on the boxed set.
    tol, max_iter
        Passed to :func:`plan_linear_maximization` (with the boxed oracle,
        ``max_iter`` counts proximal steps).
    box_tol, box_max_iter
        With the box: the boxed projection's KKT tolerance (the boxed
        oracle's certified gap, when ``tol`` is not set) and its Newton
        iterations.
    """

    def __init__(
        self,
        kernel_size: int = 5,
        p: float = 2.0,
        box: bool = False,
        box_oracle: bool = False,
        tol: float | None = None,
        max_iter: int = 100,
        box_tol: float = 1e-6,
        box_max_iter: int = 100,
    ):
        self.geometry = _PlanGeometry(kernel_size, p)
        self.transport = self.geometry.transport
        for name, value in (("box", box), ("box_oracle", box_oracle)):
            if not isinstance(value, bool):
                raise ValueError(f"{name}={value!r} is invalid: it must be True or False")
        if box_oracle and not box:
            raise ValueError("box_oracle=True needs box=True: without the box the oracle is always on the ball itself")
        self.box = box
        self.box_oracle = box_oracle
        self.tol = None if tol is None else check_positive("tol", tol, upper=1.0, upper_open=True)
        self.max_iter = check_iterations("max_iter", max_iter)
        self.box_tol = check_positive("box_tol", box_tol, upper=1.0, upper_open=True)
        self.box_max_iter = check_iterations("box_max_iter", box_max_iter)

    def __repr__(self) -> str:
        t = self.transport
        return f"FrankWolfeIterate(kernel_size={t.kernel_size}, p={t.p}, box={self.box}, box_oracle={self.box_oracle})"

    def _shown(self, plan, x, eps, extra) -> tuple[torch.Tensor, dict, torch.Tensor, torch.Tensor]:
        """The image the model sees, the multipliers to carry, the projection's iterations and convergence."""
        if not self.box or self.box_oracle:
            ones = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
            return self.geometry.image(plan, x), {}, torch.zeros(x.shape[0], dtype=torch.int64, device=x.device), ones
        cost, valid = self.geometry.layout(x)
        boxed = project_plans(
            plan, x, cost, valid, eps, multiplier=extra["box_multiplier"], capacity_multiplier=extra["capacity_multiplier"],
            box=True, box_tol=self.box_tol, box_max_iter=self.box_max_iter,
        )
        carried = {"box_multiplier": boxed.multiplier, "capacity_multiplier": boxed.capacity_multiplier}
        return self.geometry.image(boxed.plan, x), carried, boxed.iterations, boxed.converged

    def start(self, x, eps, generator=None):
        _check_centres(x)
        if self.box:
            _check_box_centres(x)
        batch = x.shape[0]
        if generator is None:
            plan = identity_plan(x, self.transport.kernel_size)
        else:
            cost, valid = self.geometry.layout(x)
            budget = check_nonnegative_eps(eps, batch, x) * x.flatten(1).sum(1)
            plan = _random_plan(x, valid, cost, budget, generator)
            if self.box_oracle:
                plan = project_plans(plan, x, cost, valid, eps, box=True, box_max_iter=self.box_max_iter).plan
        extra = {
            "plan": plan,
            "multiplier": x.new_zeros(batch),
            "radius": check_nonnegative_eps(eps, batch, x).clone(),
            "steps_at_radius": torch.zeros(batch, dtype=torch.int64, device=x.device),
        }
        if self.box:
            extra["capacity_multiplier"] = torch.zeros_like(x)
        if self.box and not self.box_oracle:
            extra["box_multiplier"] = x.new_zeros(batch)
        image, carried, _, _ = self._shown(plan, x, eps, extra)
        return IterateState(x, image, dict(extra, **carried))

    def _oracle(self, gradient, plan, x, cost, valid, eps, extra) -> PlanMaximization:
        if not self.box_oracle:
            return plan_linear_maximization(gradient, x, cost, valid, eps, tol=self.tol, max_iter=self.max_iter)
        return plan_linear_maximization(
            gradient, x, cost, valid, eps, tol=self.box_tol if self.tol is None else self.tol, max_iter=self.max_iter,
            box=True, start=plan, capacity_multiplier=extra["capacity_multiplier"], box_max_iter=self.box_max_iter,
        )

    def step(self, state, grad, eps, iteration):
        if isinstance(iteration, bool) or not isinstance(iteration, numbers.Integral) or iteration < 0:
            raise ValueError(f"iteration={iteration!r} is invalid: it must be an integer >= 0")
        grad, failed = _checked_gradient(state, grad)
        x = state.center
        k = self.transport.kernel_size
        cost, valid = self.geometry.layout(x)
        radius = check_nonnegative_eps(eps, x.shape[0], x)
        budget = radius * x.flatten(1).sum(1)
        plan = state.extra["plan"]
        spent = plan_cost(plan, cost)
        theta = torch.where(spent > budget, budget / spent.clamp_min(torch.finfo(x.dtype).tiny), torch.ones_like(spent))
        plan = theta.view(-1, 1, 1, 1) * plan + (1 - theta).view(-1, 1, 1, 1) * identity_plan(x, k)
        oracle = self._oracle(plan_gradient(grad, k), plan, x, cost, valid, eps, state.extra)
        steps = torch.where(radius != state.extra["radius"], torch.zeros_like(state.extra["steps_at_radius"]), state.extra["steps_at_radius"])
        gamma = (2.0 / (steps + 2)).to(x.dtype).view(-1, 1, 1, 1)
        plan = plan + gamma * (oracle.plan - plan)
        plan = torch.where(failed.view(-1, 1, 1, 1), identity_plan(x, k), plan)
        extra = dict(
            state.extra, plan=plan, multiplier=oracle.multiplier, radius=radius.clone(), steps_at_radius=steps + 1,
        )
        if self.box_oracle:
            # The mix of two plans of the boxed set is in it up to rounding; the repair removes that.
            extra["plan"], _ = repair_capacity(plan, x, valid)
            extra["capacity_multiplier"] = oracle.capacity_multiplier
        image, carried, box_iterations, box_converged = self._shown(extra["plan"], x, eps, extra)
        report = StepReport(
            converged=oracle.converged & box_converged & ~failed,
            solver_iterations=oracle.iterations + box_iterations,
            zero_gradient=is_zero_gradient(grad) & ~failed,
            failed=failed,
        )
        return IterateState(x, image, dict(extra, **carried)), report
