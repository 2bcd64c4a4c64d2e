"""Projected and conjugate Sinkhorn iterations on the local Wasserstein ball.

Both solve an entropy-regularized problem over local transport plans
``Pi`` (mass moves inside a ``k x k`` window, see :mod:`solvers.geometry`),
on images normalized to unit mass (``x_hat = x / m(x)``, ``w_hat = w / m(x)``,
as in Wong, Schmidt and Kolter, 2019):

Projection (paper Eq. 6), optionally with the pixel box ``z <= 1``:

.. math::

    \\min_{z, \\Pi \\ge 0} \\tfrac12 \\|\\hat w - z\\|_2^2
        + \\tfrac1\\lambda \\sum_{ij} \\Pi_{ij} \\log \\Pi_{ij}
    \\quad\\text{s.t.}\\quad \\Pi 1 = \\hat x,\\; \\Pi^\\top 1 = z,\\;
    \\langle \\Pi, C \\rangle \\le \\epsilon \\;[,\\; z \\le 1/m(x)].

Conjugate (paper Appendix D): the linear objective ``-<z, g>`` replaces the
quadratic one, i.e. a steepest-ascent step in the Wasserstein geometry.

The dual (paper Lemma 1) is maximized by block coordinate ascent (paper
Algorithm 2), with ``Pi_ij = exp(alpha_i - psi C_ij - 1 + beta_j)``:

* alpha step: ``alpha_i = log x_i - log sum_j exp(beta_j - psi C_ij - 1)``;
* beta step: ``beta_j = lam w_j - W(lam exp(lam w_j) A_j)`` with
  ``A_j = sum_i exp(alpha_i - psi C_ij - 1)``, so that ``z_j = W(.) / lam``
  (the box variant caps ``z_j`` at the bound, where the extra multiplier of
  ``z <= 1`` is active, Hu et al. 2020); the conjugate iteration keeps
  ``beta = lam g`` fixed;
* psi step: a Newton step on the concave dual in ``psi``, projected on
  ``psi >= 0``, whose curvature is the mass-weighted variance of each row's
  cost (the second derivative once the rows are re-balanced; the paper's
  raw second moment makes the step far too short on sharp problems);
* the alpha and beta potentials are over-relaxed (Thibault et al. 2017).

A target already inside the ball is certified by a greedy local plan and
returned unchanged.

Numerics. All potentials are kept in the log domain and the W function is
evaluated from the logarithm of its argument, so nothing overflows at any
lambda. The window sums run as exponential-domain grouped convolutions
(fast) whenever a per-example bound shows that float range suffices;
otherwise that example falls back, for good, to windowed log-sum-exp.

Feasibility. The returned image is the column sum of a plan whose rows sum
exactly to ``x_hat``. With the box, column excess above the bound (about the
marginal error) first moves on to neighbours with room. If the plan's cost
(or the box) is still violated, the output moves back towards ``x`` by the
smallest factor that restores feasibility, which convexity makes exact.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F

from .geometry import LocalTransport, check_images, check_nonnegative_eps
from .info import SolveInfo, SolveStatus
from .lambertw import lambertw_exp
from .rounding import summation_bound
from .device import sync_interval

# Defaults shared by the functions and the solver classes. tol = 1e-3 keeps the
# output within ~1e-3 (relative) of the fully converged entropic solution, far
# below the entropic bias itself; feasibility is exact at any tol.
DEFAULT_LAM = 1000.0
DEFAULT_TOL = 1e-3
DEFAULT_MAX_ITER = 500
DEFAULT_RELAXATION = 1.8

_INITIAL_PSI = 1.0
# Over-relaxation starts once the rows are within this L1 error (fraction of mass).
_RELAX_START = 0.5
# Stand-in for -inf where potentials are blended (avoids inf - inf).
_FINITE_MIN = -1e30
_COMPACT_FRACTION = 0.25


def _mass_floor(dtype: torch.dtype) -> float:
    """Mass below sqrt(tiny) cannot be normalized without overflow: such an image counts as empty."""
    return math.sqrt(torch.finfo(dtype).tiny)


def _exp_floor(dtype: torch.dtype) -> float:
    """Smallest exponent the exponential path uses: products of two stay normal."""
    return 0.5 * math.log(torch.finfo(dtype).tiny)


class _ExpRange:
    """Float-range limits of the exponential-domain path for one dtype.

    Scaling vectors are shifted to a maximum of 1 and their exponents (and
    the kernel's) are floored at ``floor = log(tiny) / 2``: every product of
    two factors then stays a normal number, because subnormal arithmetic is
    two orders of magnitude slower on CPUs. The floor adds at most
    ``k^2 exp(floor)`` to a window sum, so a sum is trusted when it exceeds
    ``k^2 exp(floor) / 1e-9``, i.e. the floor's relative effect is below 1e-9.
    """

    def __init__(self, dtype: torch.dtype, kernel_size: int):
        self.tiny = torch.finfo(dtype).tiny
        self.floor = _exp_floor(dtype)
        self.trusted = self.floor + math.log(kernel_size**2) - math.log(1e-9)


@dataclass
class _Problem:
    """Normalized data of the examples being iterated, all leading dim n."""

    source: torch.Tensor  # x / m(x), (n, C, H, W)
    log_source: torch.Tensor  # log of it, -inf off the support
    reach_log: torch.Tensor  # 0 within a window of some source mass (the reach), -inf off it
    reach_weight: torch.Tensor  # 1 on reach, 0 off it
    source_weight: torch.Tensor  # 1 on sources, 0 elsewhere
    off_source_inf: torch.Tensor  # 0 on sources, +inf elsewhere
    target: torch.Tensor  # lam * w_hat (projection) or fixed beta (conjugate)
    eps: torch.Tensor  # (n,)
    upper: torch.Tensor | None  # (n, 1, 1, 1) normalized pixel bound, box variant

    def select(self, index: torch.Tensor) -> "_Problem":
        return replace(
            self,
            **{
                f.name: (value[index] if isinstance(value := getattr(self, f.name), torch.Tensor) else value)
                for f in fields(self)
            },
        )


class _Windows:
    """Sums over the k x k windows, with per-example kernels of offsets."""

    def __init__(self, transport: LocalTransport, dtype: torch.dtype, device: torch.device):
        self.k = transport.kernel_size
        self.cost = transport.cost(dtype, device)  # (k, k)
        log_cost = torch.log(self.cost)  # -inf at the centre
        self.log_cost_powers = torch.stack([torch.zeros_like(log_cost), log_cost, 2 * log_cost])
        self.cost_powers = torch.stack([torch.ones_like(self.cost), self.cost, self.cost**2])
        self.range = _ExpRange(dtype, self.k)
        self.tiny = self.range.tiny
        # On a GPU, asking which examples need the log domain would stall the
        # queue every iteration: the log-domain sums are computed for all and
        # kept where needed.
        self.branch_free = sync_interval(device) > 1

    def _log_domain(self, needs_log: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The examples to recompute in the log domain and which of them to keep (None: none)."""
        if self.branch_free:
            return torch.arange(needs_log.shape[0], device=needs_log.device), needs_log
        if not bool(needs_log.any()):
            return None
        index = needs_log.nonzero()[:, 0]
        return index, torch.ones_like(index, dtype=torch.bool)

    def log_kernel(self, psi: torch.Tensor) -> torch.Tensor:
        """``-psi C - 1`` for each example, shape (n, k, k)."""
        return -psi[:, None, None] * self.cost - 1

    def _conv(self, values: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
        """Window sums of non-negative ``values`` (n,C,H,W) with kernels (n,m,k,k) -> (m,n,C,H,W)."""
        n, channels, height, width = values.shape
        m = kernels.shape[1]
        groups = m * n * channels
        weight = kernels.transpose(0, 1)[:, :, None].expand(m, n, channels, self.k, self.k)
        # One depthwise convolution over m stacked copies is faster than a
        # grouped one with m outputs per group, and each output is contiguous.
        stacked = values.reshape(1, n * channels, height, width).expand(m, n * channels, height, width)
        out = F.conv2d(
            stacked.reshape(1, groups, height, width),
            weight.reshape(groups, 1, self.k, self.k),
            padding=self.k // 2,
            groups=groups,
        )
        return out.view(m, n, channels, height, width)

    def _logsumexp(self, log_values: torch.Tensor, log_kernels: torch.Tensor) -> torch.Tensor:
        """Log of window sums from log-values (n,C,H,W) and log-kernels (n,m,k,k) -> (m,n,C,H,W)."""
        n, channels, height, width = log_values.shape
        m = log_kernels.shape[1]
        r = self.k // 2
        padded = F.pad(log_values.reshape(n * channels, 1, height, width), (r, r, r, r), value=-math.inf)
        patches = F.unfold(padded, self.k).view(1, n, channels, self.k * self.k, height * width)
        kernels = log_kernels.transpose(0, 1).reshape(m, n, 1, self.k * self.k, 1)
        return torch.logsumexp(patches + kernels, dim=3).view(m, n, channels, height, width)

    def row_sums(self, beta, psi, problem, log_mode):
        """Row potentials and the cost moments of each row's transport.

        Returns ``log sum_j exp(beta_j - psi C_ij - 1)`` (finite everywhere,
        so that ``log x_i`` minus it is -inf, not NaN, off the sources) and
        the mean cost and mean squared cost of the mass leaving pixel i once
        the rows are scaled to ``x``.
        """
        log_kernel = self.log_kernel(psi)
        floor = self.range.floor
        shift = beta.flatten(1).amax(1)[:, None, None, None]
        scaled = torch.exp((beta - shift).clamp_min(floor)) * problem.reach_weight
        sums = self._conv(scaled, torch.exp(log_kernel.clamp_min(floor))[:, None] * self.cost_powers)
        rows = sums[0]
        # Each source's own pixel (cost 0) is in its window, so a row sum far
        # above the floor's contribution is accurate.
        smallest = (rows + problem.off_source_inf).flatten(1).amin(1)
        needs_log = log_mode | ~(smallest >= math.exp(self.range.trusted))
        safe_rows = rows.clamp_min(self.tiny)
        log_rows = torch.log(safe_rows) + shift
        mean_cost = sums[1] / safe_rows
        mean_cost_sq = sums[2] / safe_rows
        recompute = self._log_domain(needs_log)
        if recompute is not None:
            index, keep = recompute
            keep = keep.view(-1, 1, 1, 1)
            log_sums = self._logsumexp(beta[index], log_kernel[index][:, None] + self.log_cost_powers)
            log_rows[index] = torch.where(keep, log_sums[0].clamp_min(torch.finfo(log_sums.dtype).min), log_rows[index])
            reached = torch.isfinite(log_sums[0])
            mean_cost[index] = torch.where(keep, torch.where(reached, torch.exp(log_sums[1] - log_sums[0]), 0.0), mean_cost[index])
            mean_cost_sq[index] = torch.where(
                keep, torch.where(reached, torch.exp(log_sums[2] - log_sums[0]), 0.0), mean_cost_sq[index]
            )
        return log_rows, mean_cost, mean_cost_sq, needs_log

    def column_log_sums(self, alpha, psi, problem, log_mode, beta):
        """``log A_j = log sum_i exp(alpha_i - psi C_ij - 1)`` for every pixel j.

        ``beta`` (the current column potential) bounds how much an error in
        ``A_j`` can move the image ``z_j = exp(beta_j) A_j``.
        """
        log_kernel = self.log_kernel(psi)
        floor = self.range.floor
        shift = alpha.flatten(1).amax(1)[:, None, None, None]
        scaled = torch.exp((alpha - shift).clamp_min(floor)) * problem.source_weight
        columns = self._conv(scaled, torch.exp(log_kernel.clamp_min(floor))[:, None])[0]
        log_columns = torch.log(columns.clamp_min(self.tiny)) + shift
        # The floor perturbs A_j by at most k^2 exp(floor + shift), which moves
        # z_j by at most exp(beta_j) times that (also through W, as W' <= 1);
        # summed over the image this must stay below 1e-9 of the mass.
        limit = -self.range.trusted - math.log(alpha[0].numel())
        needs_log = log_mode | ~(beta.flatten(1).amax(1) + shift.flatten() <= limit)
        recompute = self._log_domain(needs_log)
        if recompute is not None:
            index, keep = recompute
            log_sums = self._logsumexp(alpha[index], log_kernel[index][:, None])[0]
            log_columns[index] = torch.where(keep.view(-1, 1, 1, 1), log_sums, log_columns[index])
        return log_columns, needs_log


@dataclass
class _Iterate:
    alpha: torch.Tensor
    beta: torch.Tensor
    psi: torch.Tensor
    log_mode: torch.Tensor
    # psi is known to lie in [psi_low, psi_high] (used while beta is fixed).
    psi_low: torch.Tensor
    psi_high: torch.Tensor

    def select(self, index: torch.Tensor) -> "_Iterate":
        return _Iterate(*(getattr(self, f.name)[index] for f in fields(self)))


class _Objective(enum.Enum):
    """What the beta step enforces on the plan's columns z."""

    PROJECTION = "projection"  # z minimizes 1/2 ||w - z||^2 (Lambert W step)
    CONJUGATE = "conjugate"  # z maximizes <z, g>: beta fixed to lam g


class _SinkhornSolver:
    """The block coordinate ascent shared by both objectives."""

    def __init__(self, transport, lam, tol, max_iter, relaxation, objective: _Objective):
        self.transport = transport
        self.relaxation = relaxation
        self.lam = lam
        self.tol = tol
        self.max_iter = max_iter
        self.objective = objective

    # -- one sweep -----------------------------------------------------------------
    def _alpha_step(self, windows, state, problem):
        """Rows scaled to x: new alpha, and the plan's cost and cost variance.

        With the rows re-balanced at every psi, the dual's second derivative in
        psi is minus the mass-weighted variance of each row's cost, not the
        raw second moment; using it makes the Newton step on psi exact for the
        conjugate objective and far less timid for the projection.
        """
        log_rows, mean_cost, mean_cost_sq, log_mode = windows.row_sums(state.beta, state.psi, problem, state.log_mode)
        alpha = problem.log_source - log_rows
        cost = (problem.source * mean_cost).flatten(1).sum(1)
        variance = (problem.source * (mean_cost_sq - mean_cost**2).clamp_min(0)).flatten(1).sum(1)
        return alpha, log_rows, cost, variance, log_mode

    def _beta_step(self, log_columns, problem):
        """New beta: z_j = exp(beta_j) A_j is the optimal column sum given A."""
        if self.objective is _Objective.CONJUGATE:
            return problem.target
        # z_j = W(lam exp(lam w_j) A_j) / lam; the floor keeps W / lam a normal
        # number (see _ExpRange).
        floor = _exp_floor(log_columns.dtype)
        log_w_argument = (math.log(self.lam) + problem.target + log_columns).clamp_min(floor)
        beta = problem.target - lambertw_exp(log_w_argument)
        if problem.upper is not None:
            # Where the cap z_j <= upper binds, beta = log(upper) - log A_j is the smaller value.
            beta = torch.minimum(beta, torch.log(problem.upper) - log_columns)
        return beta + problem.reach_log

    def _relax(self, state, alpha, beta, log_columns, marginal, problem):
        """Over-relaxed potentials ``(1 - omega) old + omega new`` (Thibault et al. 2017).

        At low temperature (large lambda) Sinkhorn-type sweeps converge
        linearly with a rate close to 1; extrapolating the potentials along the
        sweep direction shortens that tail. It starts once the rows are nearly
        balanced, where the local convergence theory applies.
        """
        omega = torch.where(marginal < _RELAX_START, self.relaxation, 1.0)[:, None, None, None]
        # Potentials are -inf off the support; keep them so (no inf - inf).
        alpha = alpha + (1 - omega) * (state.alpha.clamp_min(_FINITE_MIN) - alpha.clamp_min(_FINITE_MIN))
        if self.objective is not _Objective.CONJUGATE:
            beta = beta + (1 - omega) * (state.beta.clamp_min(_FINITE_MIN) - beta.clamp_min(_FINITE_MIN))
            if problem.upper is not None:
                beta = torch.minimum(beta, torch.log(problem.upper) - log_columns)
        return alpha, beta

    def _psi_step(self, state, cost, variance, eps):
        """Newton step on the dual's psi (concave), projected on psi >= 0.

        The plan's cost falls as psi grows. While beta is fixed (conjugate)
        that function of psi does not change between sweeps, so each sweep
        also narrows a bracket around the root and a Newton step leaving it
        (or undefined, when a nearly deterministic plan has zero cost
        variance) is replaced by bisection, or by doubling while no upper end
        is known. With beta moving (projection) the function shifts every
        sweep, so the step is plain projected Newton.
        """
        psi = state.psi
        over = cost > eps
        curved = variance > 0
        newton = psi + (cost - eps) / torch.where(curved, variance, torch.ones_like(variance))
        if self.objective is not _Objective.CONJUGATE:
            # No curvature: each row pays a single cost level, so psi cannot
            # lower the cost; relax it to 0 (or grow it while over budget).
            fallback = torch.where(over, 2 * psi + 1, torch.zeros_like(psi))
            return torch.where(curved, newton, fallback).clamp_min(0), state.psi_low, state.psi_high
        low = torch.where(over, torch.maximum(state.psi_low, psi), state.psi_low)
        high = torch.where(over, state.psi_high, torch.minimum(state.psi_high, psi))
        inside = curved & (newton > low) & (newton < high)
        fallback = torch.where(torch.isinf(high), 2 * low + 1, (low + high) / 2)
        return torch.where(inside, newton, fallback), low, high

    # -- driver --------------------------------------------------------------------
    def solve(self, problem: _Problem, initial_beta: torch.Tensor):
        windows = _Windows(self.transport, problem.source.dtype, problem.source.device)
        n = problem.source.shape[0]
        device, dtype = problem.source.device, problem.source.dtype
        state = _Iterate(
            alpha=torch.full_like(problem.source, -math.inf),
            beta=initial_beta,
            psi=torch.full((n,), _INITIAL_PSI, dtype=dtype, device=device),
            log_mode=torch.zeros(n, dtype=torch.bool, device=device),
            psi_low=torch.zeros(n, dtype=dtype, device=device),
            psi_high=torch.full((n,), math.inf, dtype=dtype, device=device),
        )
        out_z = torch.zeros_like(problem.source)
        out = SolveInfo.solved(n, dtype, device)
        active = torch.arange(n, device=device)
        interval = sync_interval(device)
        for iteration in range(1, self.max_iter + 1):
            alpha, log_rows, cost, variance, log_mode = self._alpha_step(windows, state, problem)
            floor = windows.range.floor
            previous_rows = torch.exp((state.alpha + log_rows).clamp(floor, -floor)) * problem.source_weight
            marginal = (previous_rows - problem.source).abs().flatten(1).sum(1)
            psi, psi_low, psi_high = self._psi_step(state, cost, variance, problem.eps)
            log_columns, log_mode = windows.column_log_sums(alpha, psi, problem, log_mode, state.beta)
            beta = self._beta_step(log_columns, problem)
            if self.relaxation != 1.0:
                alpha, beta = self._relax(state, alpha, beta, log_columns, marginal, problem)
            slack_ok = (state.psi == 0) | (cost >= problem.eps * (1 - self.tol))
            state = _Iterate(alpha, beta, psi, log_mode, psi_low, psi_high)

            converged = (marginal <= self.tol) & (cost <= problem.eps * (1 + self.tol)) & slack_ok
            failed = ~(torch.isfinite(cost) & torch.isfinite(psi)) | torch.isnan(marginal)
            done = converged | failed | (iteration == self.max_iter)
            # Finishing and compacting cost about a sweep each time; doing it
            # for a quarter of the batch at once keeps their number small.
            if iteration % interval and iteration != self.max_iter:
                continue
            finished_count = int(done.sum())
            if finished_count == 0 or finished_count < min(done.numel(), _COMPACT_FRACTION * done.numel()):
                continue
            index = done.nonzero()[:, 0]
            finished = problem.select(index)
            z_final, cost_final, repair, log_final = self._finish(windows, state.select(index), finished)
            ok = torch.isfinite(z_final).flatten(1).all(1) & torch.isfinite(cost_final) & ~failed[index]
            out_z[active[index]] = torch.where(ok[:, None, None, None], z_final, finished.source)
            status = torch.where(
                converged[index],
                torch.full_like(index, SolveStatus.CONVERGED),
                torch.full_like(index, SolveStatus.MAX_ITERATIONS),
            )
            status = torch.where(ok, status, torch.full_like(index, SolveStatus.NUMERICAL_FAILURE))
            target = active[index]
            out.iterations[target] = iteration
            out.converged[target] = converged[index] & ok
            out.transport_cost[target] = torch.where(ok, cost_final, torch.zeros_like(cost_final))
            out.status[target] = status
            out.marginal_error[target] = marginal[index]
            out.repair[target] = torch.where(ok, repair, torch.zeros_like(repair))
            out.log_domain[target] = log_final
            keep = (~done).nonzero()[:, 0]
            if keep.numel() == 0:
                break
            active = active[keep]
            problem = problem.select(keep)
            state = state.select(keep)
        return out_z, out

    def _finish(self, windows, state, problem):
        """Exact-row plan from the last iterate, then the feasibility repair."""
        alpha, _, cost, _, log_mode = self._alpha_step(windows, state, problem)
        log_columns, log_mode = windows.column_log_sums(alpha, state.psi, problem, log_mode, state.beta)
        z = torch.exp((state.beta + log_columns).clamp_min(windows.range.floor)) * problem.reach_weight
        if problem.upper is not None:
            # Re-balancing the rows lifts some capped columns slightly above the
            # bound (by about the marginal error). Moving x towards z cannot fix
            # a pixel where x itself sits at the bound, so the excess first
            # moves on to neighbours with room, its cost added to the plan's.
            excess = (z - problem.upper).clamp_min(0)
            sent, received, extra_cost = _greedy_local_moves(excess, (problem.upper - z).clamp_min(0), self.transport)
            z = z - sent + received
            cost = cost + extra_cost
        theta = torch.where(cost > problem.eps, problem.eps / cost, torch.ones_like(cost))
        if problem.upper is not None:
            # Whatever excess found no room is removed by moving back towards x.
            over = z > problem.upper
            limits = torch.where(over, (problem.upper - problem.source) / (z - problem.source), torch.ones_like(z))
            theta = torch.minimum(theta, limits.flatten(1).amin(1))
        theta = theta.clamp(0, 1)
        t = theta[:, None, None, None]
        z = problem.source + t * (z - problem.source)
        return z, theta * cost, 1 - theta, log_mode


def _normalized_problem(x, image, eps, transport, lam, work, mass, objective, box):
    """Normalized data of the examples ``work`` and the initial beta."""
    m = mass[work][:, None, None, None]
    source = x[work] / m
    is_source = source > 0
    k = transport.kernel_size
    reach = F.max_pool2d(is_source.to(x.dtype), k, stride=1, padding=k // 2) > 0
    if objective is _Objective.CONJUGATE:
        g = image[work]
        target = lam * g / g.flatten(1).abs().amax(1)[:, None, None, None]
        initial_beta = target
    else:
        target = lam * (image[work] / m)
        initial_beta = lam * (image[work] - x[work]) / m
    problem = _Problem(
        source=source,
        log_source=torch.log(source),
        reach_log=torch.zeros_like(source).masked_fill(~reach, -math.inf),
        reach_weight=reach.to(source.dtype),
        source_weight=is_source.to(source.dtype),
        off_source_inf=torch.zeros_like(source).masked_fill(~is_source, math.inf),
        target=target,
        eps=eps[work],
        upper=(1 / m) if box else None,
    )
    return problem, initial_beta.masked_fill(~reach, -math.inf)


def _greedy_local_moves(supply, capacity, transport):
    """Move ``supply`` into ``capacity`` within the windows, cheapest offsets first.

    Offset by offset, in order of cost, each pixel sends to the pixel at that
    offset as much as both its remaining supply and the target's remaining
    capacity allow. Each offset pairs distinct pixels, so a round is one
    vectorized min; the moves form a feasible local plan, so their cost
    bounds the optimal cost of the same moves from above.

    Parameters
    ----------
    supply, capacity : Tensor (B, C, H, W)
        Non-negative mass to send out of / room to receive at each pixel.

    Returns
    -------
    sent, received : Tensor (B, C, H, W)
        Mass that left / arrived at each pixel.
    cost : Tensor (B,)
        Cost of the moves (same units as the masses).
    """
    r = transport.radius
    height, width = supply.shape[-2:]
    remaining = supply
    room = F.pad(capacity, (r, r, r, r))
    cost_table = transport.cost(torch.float64)
    offsets = sorted(
        ((dr, ds) for dr in range(-r, r + 1) for ds in range(-r, r + 1) if (dr, ds) != (0, 0)),
        key=lambda o: float(cost_table[o[0] + r, o[1] + r]),
    )
    cost = torch.zeros(supply.shape[0], dtype=supply.dtype, device=supply.device)
    for dr, ds in offsets:
        window = (..., slice(r + dr, r + dr + height), slice(r + ds, r + ds + width))
        moved = torch.minimum(remaining, room[window])
        remaining = remaining - moved
        room[window] -= moved
        cost = cost + float(cost_table[dr + r, ds + r]) * moved.flatten(1).sum(1)
    received = F.pad(capacity, (r, r, r, r)) - room
    return supply - remaining, received[..., r : r + height, r : r + width], cost


def _certify_inside(x, w, eps, transport, mass, work, box):
    """The examples of ``work`` whose ``w`` is certifiably in the ball already.

    ``w`` must be non-negative, have the mass of ``x`` up to the rounding of
    one sum over the image (:func:`solvers.rounding.summation_bound`: what
    the exact verification of an attack allows), be at most 1 with the box, and, keeping the mass both
    share in place, :func:`_greedy_local_moves` must deliver all
    of x's surplus within the windows at a cost of at most eps. Such a ``w``
    is its own projection and is returned unchanged.

    Returns the certified indices and the normalized costs of their plans.
    """
    tol = summation_bound(x.dtype, x[0].numel())
    sub_x, sub_w, sub_mass = x[work], w[work], mass[work]
    # In float64, as the verification sums: a float32 sum could hide as much error again as it allows.
    exact_mass = sub_x.double().flatten(1).sum(1)
    mass_error = (sub_w.double().flatten(1).sum(1) - exact_mass).abs()
    candidate = (sub_w >= 0).flatten(1).all(1) & (mass_error <= tol * exact_mass)
    if box:
        candidate &= (sub_w <= 1).flatten(1).all(1)
    sent, _, cost = _greedy_local_moves((sub_x - sub_w).clamp_min(0), (sub_w - sub_x).clamp_min(0), transport)
    leftover = ((sub_x - sub_w).clamp_min(0) - sent).flatten(1).sum(1)
    cost = cost / sub_mass
    certified = candidate & (leftover <= tol * sub_mass) & (cost <= eps[work])
    return work[certified], cost[certified]


def _match_mass(z: torch.Tensor, x: torch.Tensor, box: bool) -> torch.Tensor:
    """``z`` with the mass of ``x`` to one rounding of each pixel (computed in float64).

    The columns of the solver's plan come from log-sum-exps whose rounding
    grows with the exponents (up to lam times the costs), so their total can
    miss the rows' by more than the rounding of a sum; an image whose mass
    changed by more than that lies in no ball. A surplus leaves every pixel in
    proportion to its mass; a shortfall goes to the pixels that hold mass,
    in proportion to it and never past the box.
    """
    image = z.double()
    target = x.double().flatten(1).sum(1)
    current = image.flatten(1).sum(1)
    shrink = torch.where(current > target, target / current.clamp_min(torch.finfo(torch.float64).tiny), torch.ones_like(current))
    image = image * shrink[:, None, None, None]
    shortfall = (target - image.flatten(1).sum(1)).clamp_min(0)
    share = image.clamp_max((1 - image).clamp_min(0)) if box else image
    total = share.flatten(1).sum(1).clamp_min(torch.finfo(torch.float64).tiny)
    image = image + share * (shortfall / total).clamp_max(1)[:, None, None, None]
    return image.to(z.dtype)


def _run(x, image, eps, transport, lam, tol, max_iter, relaxation, *, objective, box):
    """Validate, normalize, dispatch the non-degenerate examples, assemble outputs."""
    conjugate = objective is _Objective.CONJUGATE
    check_images(x, image, w_name="g" if conjugate else "w")
    batch = x.shape[0]
    eps_tensor = check_nonnegative_eps(eps, batch, x)
    if box and bool((x > 1).any()):
        raise ValueError(f"x has entries above 1 (max {float(x.max()):.4g}): the box variant needs 0 <= x <= 1")
    mass = x.flatten(1).sum(1)
    empty = mass <= _mass_floor(x.dtype)
    degenerate = empty | (eps_tensor == 0)
    if conjugate:
        # A zero gradient has every point of the ball as maximizer: keep x.
        degenerate |= image.flatten(1).abs().amax(1) == 0

    z = x.clone()
    device = x.device
    # An empty image or a zero radius makes the ball the single point x.
    status = torch.where(empty | (eps_tensor == 0), int(SolveStatus.ZERO_MASS), int(SolveStatus.CONVERGED))
    info = SolveInfo.solved(batch, x.dtype, device, status)
    work = (~degenerate).nonzero()[:, 0]
    if work.numel() > 0 and objective is _Objective.PROJECTION:
        inside, inside_cost = _certify_inside(x, image, eps_tensor, transport, mass, work, box)
        z[inside] = image[inside]
        info.status[inside] = SolveStatus.INSIDE_BALL
        info.transport_cost[inside] = inside_cost
        work = work[~torch.isin(work, inside)]
    if work.numel() == 0:
        return z, info

    problem, initial_beta = _normalized_problem(x, image, eps_tensor, transport, lam, work, mass, objective, box)
    solver = _SinkhornSolver(transport, lam, tol, max_iter, relaxation, objective)
    z_work, out = solver.solve(problem, initial_beta)
    z[work] = _match_mass(z_work * mass[work][:, None, None, None], x[work], box)
    for name, values in out.to_dict().items():
        getattr(info, name)[work] = values
    return z, info


def projected_sinkhorn(
    x: torch.Tensor,
    w: torch.Tensor,
    eps,
    transport: LocalTransport = LocalTransport(),
    lam: float = DEFAULT_LAM,
    tol: float = DEFAULT_TOL,
    max_iter: int = DEFAULT_MAX_ITER,
    box: bool = False,
    relaxation: float = DEFAULT_RELAXATION,
):
    """Project ``w`` onto the Wasserstein ball of radius ``eps`` around ``x``.

    Solves the entropy-regularized projection (paper Eq. 6) with projected
    Sinkhorn iterations (paper Algorithm 2), batched over examples.

    Parameters
    ----------
    x : Tensor (B, C, H, W)
        Centres, entries >= 0 (pixel mass).
    w : Tensor (B, C, H, W)
        Points to project (any real entries).
    eps : float or Tensor (B,)
        Radii in normalized units (fraction of x's mass times distance^p).
    transport : LocalTransport
        Window size and cost exponent.
    lam : float
        Entropic regularization ``lambda``; larger is closer to the exact
        projection and slower (paper: 1000 for MNIST, 3000 for CIFAR-10).
    tol : float
        Stopping tolerance, relative to the mass (marginal L1 error) and to
        eps (cost constraint), checked per example.
    max_iter : int
        Iteration budget per example.
    box : bool
        Also keep ``z <= 1`` inside the projection (Hu et al. 2020).
    relaxation : float
        Over-relaxation factor ``omega`` in (0, 2) of the alpha and beta
        potentials; 1 is the paper's plain block coordinate ascent, larger
        values cut the iterations at large lambda.

    Returns
    -------
    z : Tensor (B, C, H, W)
        The projection, exactly feasible: ``z >= 0``, mass of x, transport
        cost of its plan ``<= eps`` (and ``z <= 1`` with ``box``).
    info : SolveInfo
        Per-example diagnostics.
    """
    return _run(x, w, eps, transport, lam, tol, max_iter, relaxation, objective=_Objective.PROJECTION, box=box)


def conjugate_sinkhorn(
    x: torch.Tensor,
    g: torch.Tensor,
    eps,
    transport: LocalTransport = LocalTransport(),
    lam: float = DEFAULT_LAM,
    tol: float = DEFAULT_TOL,
    max_iter: int = DEFAULT_MAX_ITER,
    relaxation: float = DEFAULT_RELAXATION,
):
    """Maximize ``<z, g>`` over the Wasserstein ball of radius ``eps`` around ``x``.

    The conjugate Sinkhorn iteration (paper Appendix D): the projected
    Sinkhorn updates with ``beta`` fixed to ``lam * g``. The maximizer does
    not change when ``g`` is scaled by a positive number, so ``g`` is scaled
    to unit max-norm per example first; ``lam`` then means the same for every
    example, and the result tends to the exact maximizer as ``lam`` grows.

    Parameters
    ----------
    x : Tensor (B, C, H, W)
        Centres, entries >= 0.
    g : Tensor (B, C, H, W)
        Linear objective (e.g. a loss gradient).
    eps, transport, lam, tol, max_iter, relaxation
        As in :func:`projected_sinkhorn`.

    The iteration runs in float64 whatever the input dtype (its potentials
    are of size ``lam``); results come back in the input dtype.

    Returns
    -------
    z : Tensor (B, C, H, W)
        A feasible point of the ball approximately maximizing ``<z, g>``.
    info : SolveInfo
        Per-example diagnostics.
    """
    check_images(x, g, w_name="g")
    # beta = lam * g reaches magnitudes of lam, where float32 resolves the
    # plan's exponents only to lam * 6e-8: the rows and columns of one plan
    # then disagree by up to 1e-3 of the mass. Float64 keeps them consistent.
    z, info = _run(
        x.double(), g.double(), eps if not torch.is_tensor(eps) else eps.double(),
        transport, lam, tol, max_iter, relaxation, objective=_Objective.CONJUGATE, box=False,
    )
    for name in ("transport_cost", "marginal_error", "repair"):
        setattr(info, name, getattr(info, name).to(x.dtype))
    return z.to(x.dtype), info
