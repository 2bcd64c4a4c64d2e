r"""Exact (LP / QP) reference solvers for the *local* Wasserstein ball.

This module is the independent cross-check for the iterative (Sinkhorn-type)
solvers of the benchmark, and the runtime verifier of adversarial examples.
It deliberately imports nothing from the rest of the project: the geometry is
re-implemented here from scratch, and only :mod:`numpy` and :mod:`scipy` are
imported at module import time (:mod:`clarabel` is imported lazily by
:func:`exact_projection`).

Geometry
--------
An image is an array :math:`x \in \mathbb{R}_{\ge 0}^{C \times H \times W}`;
its entries are pixel masses and :math:`m(x) = \sum_{c,r,s} x_{c,r,s}` is its
mass.  Pixels are indexed in C order, :math:`i = (c, r, s) \mapsto
cHW + rW + s`.  For an odd kernel size :math:`k \ge 3` let
:math:`h = \lfloor k/2 \rfloor`.  Mass at pixel :math:`i = (c, r, s)` may move
only to a pixel :math:`j = (c, r + \delta_r, s + \delta_s)` of the *same*
channel with :math:`|\delta_r| \le h`, :math:`|\delta_s| \le h`, inside the
image; such pairs :math:`(i, j)` are the *in-window pairs* :math:`E`
(at most :math:`CHWk^2` of them).  Moving one unit costs

.. math:: c_{ij} = (\delta_r^2 + \delta_s^2)^{p/2}, \qquad p > 0 .

A *local plan* is :math:`P \in \mathbb{R}_{\ge 0}^{E}` (entries outside
:math:`E` are zero).  Its row sums are :math:`(P\mathbf 1)_i =
\sum_{j:(i,j)\in E} P_{ij}` and its column sums :math:`(P^\top \mathbf 1)_j`.
Distances are reported in *normalized units*: the transport cost divided by
the mass of the reference image :math:`x`.  The ball of radius
:math:`\varepsilon` around :math:`x` is

.. math::

    B_\varepsilon(x) = \{\, P^\top \mathbf 1 \;:\; P \ge 0 \text{ local},\;
    P \mathbf 1 = x,\; \langle c, P\rangle \le \varepsilon\, m(x) \,\},

one budget per image over all channels.  If :math:`m(x) = 0` the ball is
:math:`\{0\}`.

Public functions
----------------
:func:`local_ot_distance`
    Lexicographic (max delivery, then min cost) local transport LP between
    two images; never infeasible.  Returns a :class:`TransportResult`.
:func:`linear_maximization`
    Exact LP maximum of :math:`\langle z, g\rangle` over
    :math:`B_\varepsilon(x)` (optionally intersected with the box
    :math:`z \le 1`): the project's one HiGHS reference for the support
    function of the ball.
:func:`exact_projection`
    Exact Euclidean projection onto :math:`B_\varepsilon(x)` (optionally
    intersected with the box :math:`z \le 1`) by a convex QP (Clarabel).

Batched convenience wrappers (``*_batch``) take ``(B, C, H, W)`` inputs and
loop over the batch.

All computations are carried out in float64.  Inputs may be numpy arrays,
anything :func:`numpy.asarray` accepts, or torch tensors (converted with
``np.asarray(t.detach().cpu())``; torch itself is never imported here).
Outputs are Python floats and float64 numpy arrays.
"""

from __future__ import annotations

import operator
import time
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linprog

__all__ = [
    "ExactSolverError",
    "HIGHS_TOLERANCE",
    "TransportResult",
    "ProjectionInfo",
    "local_ot_distance",
    "linear_maximization",
    "exact_projection",
    "local_ot_distance_batch",
    "linear_maximization_batch",
    "exact_projection_batch",
]


class ExactSolverError(RuntimeError):
    """An LP/QP solver (HiGHS or Clarabel) did not return a trustworthy optimum."""


# --------------------------------------------------------------------------
# Result containers
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class TransportResult:
    r"""Result of :func:`local_ot_distance`.

    Attributes
    ----------
    cost : float
        Normalized transport cost :math:`\langle c, P^\star\rangle / m(x)`
        of the lexicographically optimal plan (``0.0`` when :math:`m(x)=0`,
        in which case nothing can move).
    raw_cost : float
        Un-normalized cost :math:`\langle c, P^\star\rangle`.
    undelivered_mass : float
        Absolute mass of ``z`` that the plan does *not* supply from ``x``
        within the windows, :math:`m(z_+) - \sum P^\star + m(z_-) \ge 0`,
        where :math:`z_- = \max(-z, 0)` is the clipped negative part (see
        ``clipped_mass``).  Zero (up to solver tolerance, about ``1e-9``
        relative) iff every unit of ``z`` is reachable from ``x``.
    mass_x : float
        :math:`m(x)`.
    mass_z : float
        :math:`m(z_+)`, the mass of ``z`` after clipping negative entries
        to 0.
    unused_mass : float
        Mass of ``x`` left unshipped, :math:`m(x) - \sum P^\star \ge 0`.
        ``z`` lies in a ball around ``x`` iff ``undelivered_mass`` *and*
        ``unused_mass`` vanish and ``cost <= eps``.
    clipped_mass : float
        :math:`m(z_-) = \sum \max(-z, 0)`: total magnitude of the negative
        entries of ``z`` that were clipped to 0 (e.g. ``-1e-9`` float noise).
        It is included in ``undelivered_mass``, so material negative entries
        are never silently ignored.
    plan : scipy.sparse.csr_matrix or None
        The plan :math:`P^\star` as an ``(n, n)`` sparse matrix over
        flattened pixel indices (``n = C*H*W``), in original (un-scaled) mass
        units; only present when ``return_plan=True``.
    """

    cost: float
    raw_cost: float
    undelivered_mass: float
    mass_x: float
    mass_z: float
    unused_mass: float = 0.0
    clipped_mass: float = 0.0
    plan: Optional[Any] = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class ProjectionInfo:
    r"""Diagnostics returned by :func:`exact_projection` with ``return_info=True``.

    Attributes
    ----------
    cost : float
        Normalized cost :math:`\langle c, P\rangle / m(x)` of the (repaired,
        exactly feasible) plan whose column sums are the returned ``z``.
    raw_cost : float
        Un-normalized cost of that plan.
    distance_sq : float
        :math:`\|w - z\|_2^2`.
    status : str
        ``"Solved"`` (Clarabel status of the accepted solve), ``"Inside"``
        (``w`` was already in the ball, no QP solved) or ``"Trivial"``
        (:math:`m(x) = 0` or :math:`\varepsilon = 0`).
    iterations : int
        Interior-point iterations of the accepted solve.
    solve_time : float
        Wall time (s) of the whole function call.
    repair : float
        :math:`\max_j |z_j - \hat z_j|`, the max-abs change between the
        solver's ``z`` and the column sums of the repaired plan (a measure
        of the solver's residual error; typically ``< 1e-9``).
    n_variables : int
        Number of QP variables (plan entries plus free ``z`` entries).
    polished : bool
        Whether the active-set polishing step succeeded (certified KKT
        point to ``1e-10``; see :func:`exact_projection`).
    kkt_residual : float
        Max-abs residual of the polished equality-constrained KKT system
        (``nan`` if polishing was not attempted).
    """

    cost: float
    raw_cost: float
    distance_sq: float
    status: str
    iterations: int
    solve_time: float
    repair: float
    n_variables: int
    polished: bool = False
    kkt_residual: float = float("nan")


# --------------------------------------------------------------------------
# Input handling and validation
# --------------------------------------------------------------------------


def _to_numpy(a: Any, name: str) -> np.ndarray:
    """Convert an array-like / torch tensor to a float64 numpy array."""
    if hasattr(a, "detach") and hasattr(a, "cpu"):  # torch tensor, duck-typed
        t = a.detach().cpu()
        try:
            arr = np.asarray(t)
        except (TypeError, RuntimeError):  # e.g. bfloat16 has no numpy dtype
            arr = np.asarray(t.double())
    else:
        arr = np.asarray(a)
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.floating)
        or np.issubdtype(arr.dtype, np.integer)
        or arr.dtype == np.bool_
    ):
        raise ValueError(
            f"{name} must be a real numeric array (float or int), got dtype {arr.dtype}"
        )
    arr = np.array(arr, dtype=np.float64, copy=True)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must contain only finite values (found NaN or inf)")
    return arr


def _check_image(a: Any, name: str, ndim: int = 3) -> np.ndarray:
    arr = _to_numpy(a, name)
    if arr.ndim != ndim:
        layout = "(C, H, W)" if ndim == 3 else "(B, C, H, W)"
        raise ValueError(
            f"{name} must be a {ndim}-D array of shape {layout}, got shape {arr.shape}"
        )
    if arr.size == 0:
        raise ValueError(f"{name} must be non-empty, got shape {arr.shape}")
    return arr


def _check_x(a: Any, name: str = "x", ndim: int = 3) -> np.ndarray:
    arr = _check_image(a, name, ndim)
    if np.any(arr < 0):
        raise ValueError(
            f"{name} must be non-negative (pixel mass); min entry is {arr.min()!r}. "
            "Clip the reference image to >= 0 before calling."
        )
    return arr


def _check_same_shape(x: np.ndarray, other: np.ndarray, name: str) -> None:
    if other.shape != x.shape:
        raise ValueError(
            f"{name} must have the same shape as x: got {other.shape} vs x {x.shape}"
        )


def _check_kernel_size(kernel_size: Any) -> int:
    if isinstance(kernel_size, (bool, np.bool_)):
        raise ValueError(f"kernel_size must be an odd int >= 3, got {kernel_size!r}")
    try:
        k = operator.index(kernel_size)
    except TypeError:
        raise ValueError(
            f"kernel_size must be an odd int >= 3, got {kernel_size!r} "
            f"of type {type(kernel_size).__name__}"
        ) from None
    if k < 3 or k % 2 == 0:
        raise ValueError(f"kernel_size must be an odd int >= 3, got {k}")
    return int(k)


def _check_positive_p(p: Any) -> float:
    try:
        pf = float(p)
    except (TypeError, ValueError):
        raise ValueError(f"p must be a finite real number > 0, got {p!r}") from None
    if not np.isfinite(pf) or pf <= 0:
        raise ValueError(f"p must be a finite real number > 0, got {p!r}")
    return pf


def _check_eps(eps: Any) -> float:
    try:
        e = float(eps)
    except (TypeError, ValueError):
        raise ValueError(f"eps must be a finite real number >= 0, got {eps!r}") from None
    if not np.isfinite(e) or e < 0:
        raise ValueError(f"eps must be a finite real number >= 0, got {eps!r}")
    return e


# --------------------------------------------------------------------------
# Geometry: in-window pairs
# --------------------------------------------------------------------------


def _window_pairs(
    shape: Tuple[int, int, int],
    kernel_size: int,
    p: float,
    src_ok: Optional[np.ndarray] = None,
    dst_ok: Optional[np.ndarray] = None,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Enumerate the in-window pairs :math:`E` and their costs.

    Parameters
    ----------
    shape : tuple of int
        ``(C, H, W)``.
    kernel_size : int
        Odd window size :math:`k`; offsets satisfy
        :math:`|\delta_r|, |\delta_s| \le \lfloor k/2 \rfloor`.
    p : float
        Cost exponent, :math:`c = (\delta_r^2 + \delta_s^2)^{p/2}`.
    src_ok, dst_ok : ndarray of bool, shape (C*H*W,), optional
        If given, keep only pairs whose source (resp. destination) is
        ``True`` (pairs touching a zero-mass source can carry no mass).

    Returns
    -------
    src, dst : ndarray of int64
        Flattened pixel indices of each pair.
    cost : ndarray of float64
        :math:`c_{ij}` of each pair (exactly 0 for the diagonal pair).
    """
    C, H, W = shape
    h = kernel_size // 2
    idx = np.arange(C * H * W, dtype=np.int64).reshape(C, H, W)
    srcs, dsts, costs = [], [], []
    for dr in range(-h, h + 1):
        r0, r1 = max(0, -dr), min(H, H - dr)
        if r0 >= r1:
            continue
        for ds in range(-h, h + 1):
            s0, s1 = max(0, -ds), min(W, W - ds)
            if s0 >= s1:
                continue
            s = idx[:, r0:r1, s0:s1].ravel()
            d = s + dr * W + ds
            keep = None
            if src_ok is not None:
                keep = src_ok[s]
            if dst_ok is not None:
                keep = dst_ok[d] if keep is None else keep & dst_ok[d]
            if keep is not None:
                s, d = s[keep], d[keep]
            if s.size == 0:
                continue
            cval = 0.0 if (dr == 0 and ds == 0) else float(dr * dr + ds * ds) ** (p / 2.0)
            srcs.append(s)
            dsts.append(d)
            costs.append(np.full(s.size, cval, dtype=np.float64))
    if not srcs:
        e = np.zeros(0, dtype=np.int64)
        return e, e.copy(), np.zeros(0, dtype=np.float64)
    return np.concatenate(srcs), np.concatenate(dsts), np.concatenate(costs)


def _incidence(index: np.ndarray, n: int) -> sp.csr_matrix:
    """Sparse ``(n, len(index))`` 0/1 matrix with a one at ``(index[e], e)``."""
    m = index.size
    return sp.csr_matrix(
        (np.ones(m, dtype=np.float64), (index, np.arange(m, dtype=np.int64))),
        shape=(n, m),
    )


def _compress(index: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Map the used values of ``index`` to ``0..u-1``; return (used, local)."""
    used, local = np.unique(index, return_inverse=True)
    return used, local.astype(np.int64)


# --------------------------------------------------------------------------
# HiGHS helper
# --------------------------------------------------------------------------

HIGHS_TOLERANCE = 1e-10
"""HiGHS's primal and dual feasibility tolerance here, on masses scaled to at most 1."""


def _highs(c, A_ub=None, b_ub=None, A_eq=None, b_eq=None, what: str = "LP"):
    res = linprog(
        c,
        A_ub=A_ub,
        b_ub=b_ub,
        A_eq=A_eq,
        b_eq=b_eq,
        bounds=(0, None),
        method="highs",
        options={
            "primal_feasibility_tolerance": HIGHS_TOLERANCE,
            "dual_feasibility_tolerance": HIGHS_TOLERANCE,
            "presolve": True,
        },
    )
    if res.status != 0 or res.x is None:
        raise ExactSolverError(
            f"HiGHS failed on the {what} (status {res.status}): {res.message}"
        )
    return res


# --------------------------------------------------------------------------
# 1. Distance
# --------------------------------------------------------------------------


def local_ot_distance(
    x: Any,
    z: Any,
    kernel_size: int,
    p: float,
    return_plan: bool = False,
) -> TransportResult:
    r"""Local optimal-transport distance from ``x`` to ``z`` (robust LP).

    Let :math:`z_+ = \max(z, 0)` and :math:`z_- = \max(-z, 0)` (negative
    entries, e.g. ``-1e-9`` float noise, are clipped but their magnitude is
    counted as undelivered mass).  With the in-window pairs :math:`E` and
    costs :math:`c_{ij}` (see module docstring) the problem is the
    *lexicographic* LP

    .. math::

        \text{(1)}\quad D^\star = \max_{P \ge 0} \sum_{(i,j)\in E} P_{ij}
        \quad\text{s.t.}\quad P\mathbf 1 \le x,\; P^\top\mathbf 1 \le z_+,

    .. math::

        \text{(2)}\quad \min_{P \ge 0} \langle c, P\rangle
        \quad\text{s.t.}\quad P\mathbf 1 \le x,\; P^\top\mathbf 1 \le z_+,\;
        \textstyle\sum P \ge D^\star .

    Both stages are always feasible (:math:`P = 0` is feasible), so float32
    rounding (``m(z) != m(x)`` by ``1e-7``) or unreachable mass never makes
    the problem infeasible; the mismatch shows up as ``undelivered_mass`` /
    ``unused_mass`` instead.

    **Single solve with an exact penalty.**  (1)+(2) are solved as one LP,
    :math:`\min_{P \in F} \langle c - M\mathbf 1, P\rangle` over the
    feasible set :math:`F` of (1), with

    .. math:: M = (L + 1)\,\max(c_{\max}, 1), \qquad
              L = \min(\#\{i : x_i > 0\},\ \#\{j : z_j > 0\}).

    *Why M is large enough.*  Let :math:`f(D) = \min\{\langle c, P\rangle :
    P \in F,\ \sum P = D\}` for :math:`D \in [0, D^\star]`; :math:`f` is
    convex and piecewise linear (parametric right-hand side), and the
    penalized LP minimizes :math:`f(D) - MD` over :math:`D`.  :math:`F` is
    a bipartite min-cost-flow network (supersource :math:`\to` pixel
    :math:`i` with capacity :math:`x_i`, :math:`i \to j` for
    :math:`(i,j) \in E` with cost :math:`c_{ij} \ge 0`, :math:`j \to`
    supersink with capacity :math:`z_j`).  By the successive-shortest-path
    theorem the slope :math:`f'_+(D)` is the cost of a shortest augmenting
    path in the residual network of an optimal flow of value :math:`D`.  A
    simple augmenting path alternates forward pair arcs (cost
    :math:`\le c_{\max}`) and backward pair arcs (cost :math:`-c_{ij} \le
    0`) and visits each pixel at most once, so it has at most :math:`L`
    forward arcs and costs at most :math:`L c_{\max} < M`.  Hence
    :math:`f(D) - MD` is strictly decreasing on :math:`[0, D^\star]`, every
    minimizer delivers :math:`D^\star`, and among those it minimizes
    :math:`\langle c, P\rangle`: exactly the lexicographic optimum.  (For
    28x28, :math:`k = 5`, :math:`p = 2`: :math:`M \approx 6.3\cdot 10^3`,
    harmless in double precision.)

    The LP has one variable per in-window pair whose source has
    :math:`x_i > 0` and whose destination has :math:`z_j > 0`, and a sparse
    constraint matrix; it is solved by HiGHS (``scipy.optimize.linprog``,
    ``method='highs'``, feasibility tolerances ``HIGHS_TOLERANCE`` = ``1e-10``) after rescaling the
    masses by :math:`\max(m(x), m(z_+))` (HiGHS tolerances are absolute);
    results are scaled back.  Tolerance-level overshoots of the row/column
    bounds are removed by scaling rows/columns of the plan down, so the
    reported ``undelivered_mass`` / ``unused_mass`` are those of a plan that
    is feasible for (1) (conservative).

    Parameters
    ----------
    x : array_like or torch.Tensor, shape (C, H, W)
        Reference image, entries :math:`\ge 0` (exactly; otherwise
        ``ValueError``).
    z : array_like or torch.Tensor, shape (C, H, W)
        Candidate image (e.g. an adversarial example).
    kernel_size : int
        Odd window size :math:`k \ge 3`.
    p : float
        Cost exponent :math:`p > 0`.
    return_plan : bool, default False
        Attach the optimal plan (``scipy.sparse.csr_matrix``, shape
        ``(n, n)`` with ``n = C*H*W``) to the result.

    Returns
    -------
    TransportResult
        ``cost`` = :math:`\langle c, P^\star\rangle / m(x)` (0.0 if
        :math:`m(x) = 0`), ``raw_cost``, ``undelivered_mass``
        = :math:`m(z_+) - \sum P^\star + m(z_-)`, ``mass_x``, ``mass_z``
        = :math:`m(z_+)`, ``unused_mass`` = :math:`m(x) - \sum P^\star`,
        ``clipped_mass`` = :math:`m(z_-)`, ``plan``.

    Raises
    ------
    ValueError
        Invalid shapes, ``kernel_size``, ``p``, negative ``x``, non-finite
        entries.
    ExactSolverError
        HiGHS did not report an optimal solution.

    Notes
    -----
    ``z`` is in :math:`B_\varepsilon(x)` (up to tolerance ``tol``) iff
    ``undelivered_mass <= tol``, ``unused_mass <= tol`` and
    ``cost <= eps``.  The distance is symmetric when :math:`m(x) = m(z)`
    because windows and costs are symmetric.  It is **not** a metric in
    general: the local ground cost (:math:`+\infty` outside the window)
    violates the triangle inequality, e.g. for ``k = 3``, ``p = 1``,
    ``x = [[0,0,1],[0,1,1]]``, ``y = [[0,1,0],[0,1,1]]``,
    ``z = [[1,0,0],[0,1,1]]``: :math:`d(x,y) = d(y,z) = 1/3` but
    :math:`d(x,z) = 2\sqrt2/3`.  With a window covering the image and
    :math:`p \le 1` it is the ordinary (metric) :math:`W_1`-type cost.
    """
    k = _check_kernel_size(kernel_size)
    pf = _check_positive_p(p)
    xa = _check_x(x, "x")
    za = _check_image(z, "z")
    _check_same_shape(xa, za, "z")

    n = xa.size
    xf = xa.ravel()
    zf = za.ravel()
    zpos = np.maximum(zf, 0.0)
    clipped = float(np.maximum(-zf, 0.0).sum())
    mass_x = float(xf.sum())
    mass_z = float(zpos.sum())

    def _empty_plan():
        return sp.csr_matrix((n, n), dtype=np.float64) if return_plan else None

    if mass_x == 0.0 or mass_z == 0.0:
        # Nothing can move: either no supply or no demand.
        return TransportResult(
            cost=0.0,
            raw_cost=0.0,
            undelivered_mass=mass_z + clipped,
            mass_x=mass_x,
            mass_z=mass_z,
            unused_mass=mass_x,
            clipped_mass=clipped,
            plan=_empty_plan(),
        )

    src, dst, cost = _window_pairs(za.shape, k, pf, src_ok=xf > 0, dst_ok=zpos > 0)
    if src.size == 0:
        return TransportResult(
            cost=0.0,
            raw_cost=0.0,
            undelivered_mass=mass_z + clipped,
            mass_x=mass_x,
            mass_z=mass_z,
            unused_mass=mass_x,
            clipped_mass=clipped,
            plan=_empty_plan(),
        )

    scale = max(mass_x, mass_z)
    used_s, ls = _compress(src)
    used_d, ld = _compress(dst)
    A = sp.vstack([_incidence(ls, used_s.size), _incidence(ld, used_d.size)]).tocsr()
    b = np.concatenate([xf[used_s], zpos[used_d]]) / scale

    # Single solve with an exact penalty (see docstring for why M suffices).
    n_aug = min(used_s.size, used_d.size)
    penalty = (n_aug + 1) * max(float(cost.max()), 1.0)
    res = _highs(cost - penalty, A_ub=A, b_ub=b, what="penalized local-transport LP")
    P = np.maximum(res.x, 0.0)
    # Guard against tolerance-level overshoot of the row / column bounds.
    P = _cap_rows_cols(P, ls, ld, xf[used_s] / scale, zpos[used_d] / scale)

    delivered = float(P.sum()) * scale
    raw_cost = float(cost @ P) * scale
    plan = None
    if return_plan:
        plan = sp.csr_matrix((P * scale, (src, dst)), shape=(n, n))
    return TransportResult(
        cost=raw_cost / mass_x,
        raw_cost=raw_cost,
        undelivered_mass=max(mass_z - delivered, 0.0) + clipped,
        mass_x=mass_x,
        mass_z=mass_z,
        unused_mass=max(mass_x - delivered, 0.0),
        clipped_mass=clipped,
        plan=plan,
    )


def _cap_rows_cols(P, ls, ld, row_cap, col_cap):
    """Scale rows/cols of a plan down so row sums <= row_cap, col sums <= col_cap."""
    rs = np.bincount(ls, weights=P, minlength=row_cap.size)
    f = np.ones_like(rs)
    over = rs > row_cap
    f[over] = row_cap[over] / rs[over]
    P = P * f[ls]
    cs = np.bincount(ld, weights=P, minlength=col_cap.size)
    g = np.ones_like(cs)
    over = cs > col_cap
    g[over] = col_cap[over] / cs[over]
    return P * g[ld]


# --------------------------------------------------------------------------
# Plan repair shared by linear_maximization and exact_projection
# --------------------------------------------------------------------------


def _repair_plan(P, src, cost, xf, budget, diag_index):
    r"""Make a solver plan exactly feasible for the ball.

    1. clip :math:`P \ge 0`;
    2. rescale each row so that :math:`P\mathbf 1 = x` exactly (rows that
       came back empty put their mass on the zero-cost diagonal pair);
    3. if :math:`\langle c, P\rangle > \text{budget}`, mix with the identity
       plan :math:`D = \operatorname{diag}(x)` (cost 0):
       :math:`P \leftarrow \theta P + (1-\theta) D`,
       :math:`\theta = \text{budget}/\langle c, P\rangle`.

    The changes are of the order of the solver tolerances.
    """
    P = np.maximum(P, 0.0)
    rs = np.bincount(src, weights=P, minlength=xf.size)
    rows = xf > 0
    fac = np.zeros_like(rs)
    ok = rows & (rs > 0)
    fac[ok] = xf[ok] / rs[ok]
    P = P * fac[src]
    empty = rows & ~(rs > 0)
    if np.any(empty):
        P[diag_index[empty]] += xf[empty]
    c = float(cost @ P)
    if c > budget:
        theta = budget / c
        P = theta * P
        P[diag_index[rows]] += (1.0 - theta) * xf[rows]
    return P


def _repair_box(P, src, dst, xf, diag_index, rounds: int = 50):
    r"""Keep a plan of the ball in the box :math:`P^\top \mathbf 1 \le 1` (``x <= 1``) without leaving the ball.

    Each round scales down the mass arriving at every over-full pixel from
    *other* pixels so that the pixel holds 1 less a few units in the last
    place (against rounding), and returns what it removed to each source's
    diagonal pair: row sums are kept, entries stay non-negative and the
    cost can only drop. Overflow left after ``rounds`` rounds is removed by
    mixing with the identity plan, :math:`P \leftarrow \theta P + (1 -
    \theta) D` with the largest :math:`\theta` that fits.
    """
    headroom = 1.0 - 4 * np.finfo(np.float64).eps
    moving = src != dst
    for _ in range(rounds):
        z = np.bincount(dst, weights=P, minlength=xf.size)
        over = z > 1.0
        if not np.any(over):
            return P
        kept = np.zeros_like(z)
        kept[src[~moving]] = P[~moving]
        keep = np.where(over, np.clip((headroom - kept) / np.maximum(z - kept, np.finfo(np.float64).tiny), 0.0, 1.0), 1.0)
        scaled = np.where(moving, P * keep[dst], P)
        returned = np.bincount(src, weights=P - scaled, minlength=xf.size)
        P = scaled
        rows = xf > 0
        P[diag_index[rows]] += returned[rows]
    z = np.bincount(dst, weights=P, minlength=xf.size)
    over = z > 1.0
    if np.any(over):
        # theta (z_j - x_j) + x_j <= 1 at every over-full pixel; x <= 1 keeps theta >= 0.
        theta = float(np.min(np.clip((headroom - xf[over]) / (z[over] - xf[over]), 0.0, 1.0)))
        P = theta * P
        rows = xf > 0
        P[diag_index[rows]] += (1.0 - theta) * xf[rows]
    return P


def _diag_index(src, dst, n):
    d = np.full(n, -1, dtype=np.int64)
    on = src == dst
    d[src[on]] = np.nonzero(on)[0]
    return d


# --------------------------------------------------------------------------
# 2. Linear maximization
# --------------------------------------------------------------------------


def linear_maximization(
    x: Any, g: Any, eps: float, kernel_size: int, p: float, box: bool = False
) -> Tuple[float, np.ndarray]:
    r"""Exact maximum of a linear functional over the local Wasserstein ball.

    Solves the LP

    .. math::

        \max_{P \ge 0 \text{ local}} \sum_{(i,j)\in E} g_j P_{ij}
        \quad\text{s.t.}\quad P\mathbf 1 = x,\quad
        \langle c, P\rangle \le \varepsilon\, m(x)
        \quad(\text{and } P^\top \mathbf 1 \le 1 \text{ if } \texttt{box}),

    i.e. :math:`\max_{z \in B_\varepsilon(x)} \langle z, g\rangle` with
    :math:`z = P^\top\mathbf 1`: the support function of the ball, which
    the conjugate Sinkhorn solver, the plan-space oracle and the
    certificates' dual bounds (:mod:`solvers.support`) compute fast; this
    is their reference.  One HiGHS solve with a sparse constraint
    matrix; ``x`` is scaled to unit mass and ``g`` to unit max-norm before
    solving.  The returned ``z`` is the column-sum vector of the HiGHS plan
    after a tolerance-level repair (clip to :math:`\ge 0`, renormalize rows
    to :math:`x`, mix with the identity plan if the budget is exceeded, and
    with the box send mass arriving at over-full pixels back to its source),
    so it is feasible (with the box, to a few units in the last place);
    ``value`` is :math:`\langle z, g\rangle` evaluated in float64 and is
    therefore a certified lower bound on the LP optimum that matches it to
    about ``1e-9`` relative accuracy.

    Parameters
    ----------
    x : array_like or torch.Tensor, shape (C, H, W)
        Centre of the ball, entries :math:`\ge 0`.
    g : array_like or torch.Tensor, shape (C, H, W)
        Linear functional (e.g. a gradient); any finite real values.
    eps : float
        Radius :math:`\varepsilon \ge 0` in normalized units.
    kernel_size : int
        Odd window size :math:`k \ge 3`.
    p : float
        Cost exponent :math:`p > 0`.
    box : bool, default False
        Intersect the ball with :math:`z \le 1` (then ``x`` must be at most 1).

    Returns
    -------
    value : float
        :math:`\max_{z\in B_\varepsilon(x)} \langle z, g\rangle`.
    z : ndarray of float64, shape (C, H, W)
        A maximizer.

    Raises
    ------
    ValueError
        Invalid inputs, or ``box=True`` with a pixel of ``x`` above 1 (the
        boxed ball is then empty).
    ExactSolverError
        HiGHS did not report an optimal solution.

    Notes
    -----
    For :math:`\varepsilon = 0` (or :math:`m(x) = 0`) the ball is
    :math:`\{x\}` and the answer is :math:`(\langle x, g\rangle, x)`.
    Bounds: :math:`\langle x, g\rangle \le` value :math:`\le \sum_i x_i
    \max_{j:(i,j)\in E} g_j`, and value is non-decreasing and concave in
    :math:`\varepsilon`.
    """
    k = _check_kernel_size(kernel_size)
    pf = _check_positive_p(p)
    e = _check_eps(eps)
    xa = _check_x(x, "x")
    ga = _check_image(g, "g")
    _check_same_shape(xa, ga, "g")
    box = bool(box)
    if box and np.any(xa > 1.0):
        raise ValueError(
            f"linear_maximization: box=True needs x <= 1 (max entry {xa.max()!r}): otherwise the boxed ball is empty"
        )

    xf = xa.ravel()
    gf = ga.ravel()
    mass_x = float(xf.sum())
    if mass_x == 0.0 or e == 0.0:
        z = xa.copy()
        return float(np.dot(xf, gf)), z
    gscale = float(np.max(np.abs(gf)))
    if gscale == 0.0:
        return 0.0, xa.copy()

    src, dst, cost = _window_pairs(xa.shape, k, pf, src_ok=xf > 0)
    x1 = xf / mass_x  # unit mass
    used_s, ls = _compress(src)
    A_eq = _incidence(ls, used_s.size)
    b_eq = x1[used_s]
    A_ub = sp.csr_matrix(cost.reshape(1, -1))
    b_ub = np.array([e])
    if box:
        # Capacities in unit-mass units: each destination holds at most 1 / m(x).
        used_d, ld = _compress(dst)
        A_ub = sp.vstack([A_ub, _incidence(ld, used_d.size)]).tocsr()
        b_ub = np.concatenate([b_ub, np.full(used_d.size, 1.0 / mass_x)])
    res = _highs(
        -(gf[dst] / gscale), A_ub=A_ub, b_ub=b_ub, A_eq=A_eq, b_eq=b_eq,
        what="linear-maximization LP",
    )
    diag_index = _diag_index(src, dst, xf.size)
    P = _repair_plan(res.x, src, cost, x1, e, diag_index) * mass_x
    if box:
        P = _repair_box(P, src, dst, xf, diag_index)
    z = np.bincount(dst, weights=P, minlength=xf.size).reshape(xa.shape)
    value = float(np.dot(z.ravel(), gf))
    lp_value = -float(res.fun) * gscale * mass_x
    tol = 1e-6 * gscale * mass_x
    if not value >= lp_value - tol:
        raise ExactSolverError(
            f"linear maximization: repaired value {value!r} deviates from the LP "
            f"optimum {lp_value!r} by more than {tol:.3g}"
        )
    return value, z


# --------------------------------------------------------------------------
# Active-set polishing of the projection QP
# --------------------------------------------------------------------------

_POLISH_DELTA = 1e-9
_POLISH_TOL = 1e-10


def _polish_projection(
    P0, z0, mu, lam, budget_slack, box_dual, box_slack,
    ls, ld, cost, x_u, w_u, budget, ubox, y_col=None, y_row=None,
):
    r"""Solve the projection QP's KKT system exactly on the IPM's active set.

    With the active set guessed from the interior-point solution by strict
    complementarity (plan support :math:`S = \{e : P_e > \mu_e\}`, budget
    active iff :math:`\lambda > b - \langle c, P\rangle`, box rows active iff
    dual > slack), the QP reduces to the equality-constrained QP

    .. math::

        \min \tfrac12\|z - w\|^2 \ \text{s.t.}\ z - K_S P_S = 0,\
        R_S P_S = x,\ [\langle c_S, P_S\rangle = b],\ [z_B = u_B],

    whose KKT matrix is singular in general (plans are not unique).  It is
    solved as OSQP-style polishing does: factor the regularized matrix
    :math:`\begin{psmallmatrix}H + \delta I & A^\top\\ A & -\delta I
    \end{psmallmatrix}` once (``splu``) and run iterative refinement against
    the unregularized system starting from the IPM primal-dual point (a
    proximal-point iteration, which converges for consistent singular
    systems and stays near the starting point along singular directions).  The
    result is accepted only if it is a KKT point of the *original* QP to
    ``_POLISH_TOL``: :math:`P_S \ge 0`, reduced costs
    :math:`\mu_e = -\nu_{1,j} + \nu_{2,i} + \nu_3 c_e \ge 0` on *all*
    pairs, :math:`\nu_3, \nu_4 \ge 0`, inactive inequalities satisfied.

    Returns
    -------
    P : ndarray or None
        Full plan vector (zeros off the support), or ``None`` if the checks
        failed (the caller then keeps the interior-point solution).
    residual : float
        Final max-abs KKT residual of the equality system.
    """
    from scipy.sparse.linalg import splu

    m = P0.size
    nz = z0.size
    n_s = x_u.size
    S = np.nonzero(P0 > mu)[0]
    budget_on = bool(lam > budget_slack)
    B = np.nonzero(box_dual > box_slack)[0] if box_dual is not None else np.zeros(0, np.int64)
    mS = S.size
    if mS == 0:
        return None, np.inf
    KS = sp.csr_matrix((np.ones(mS), (ld[S], np.arange(mS))), shape=(nz, mS))
    RS = sp.csr_matrix((np.ones(mS), (ls[S], np.arange(mS))), shape=(n_s, mS))
    rows = [sp.hstack([-KS, sp.identity(nz, format="csr")]), sp.hstack([RS, sp.csr_matrix((n_s, nz))])]
    rhs_c = [np.zeros(nz), x_u]
    if budget_on:
        rows.append(sp.hstack([sp.csr_matrix(cost[S].reshape(1, -1)), sp.csr_matrix((1, nz))]))
        rhs_c.append(np.array([budget]))
    if B.size:
        EB = sp.csr_matrix((np.ones(B.size), (np.arange(B.size), B)), shape=(B.size, nz))
        rows.append(sp.hstack([sp.csr_matrix((B.size, mS)), EB]))
        rhs_c.append(np.full(B.size, ubox))
    A = sp.vstack(rows).tocsr()
    nr = A.shape[0]
    nu = mS + nz
    H = sp.diags(np.concatenate([np.zeros(mS), np.ones(nz)]))
    K0 = sp.bmat([[H, A.T], [A, None]], format="csc")
    Kreg = (K0 + sp.diags(np.concatenate([np.full(nu, _POLISH_DELTA), np.full(nr, -_POLISH_DELTA)]))).tocsc()
    rhs = np.concatenate([np.zeros(mS), w_u] + rhs_c)
    try:
        lu = splu(Kreg)
    except RuntimeError:  # singular factorization
        return None, np.inf
    # Start from the interior-point primal *and* dual point: the proximal
    # iteration then stays close to it along directions in which the KKT
    # system is singular (non-unique plans, and non-unique multipliers, e.g.
    # a constant shift on a support component whose sinks all sit at the box
    # bound), so the dual-feasibility checks below see the IPM's multipliers.
    nu0 = [np.zeros(nz) if y_col is None else y_col, np.zeros(n_s) if y_row is None else y_row]
    if budget_on:
        nu0.append(np.array([lam]))
    if B.size:
        nu0.append(box_dual[B])
    sol = np.concatenate([P0[S], z0] + nu0)
    res = np.inf
    for _ in range(50):
        r = rhs - K0 @ sol
        res = float(np.max(np.abs(r)))
        if res <= 1e-14:
            break
        sol = sol + lu.solve(r)
    if not np.all(np.isfinite(sol)) or res > 1e-12:
        return None, res
    PS, z = sol[:mS], sol[mS:nu]
    nu1 = sol[nu: nu + nz]
    nu2 = sol[nu + nz: nu + nz + n_s]
    off = nu + nz + n_s
    nu3 = 0.0
    if budget_on:
        nu3 = float(sol[off])
        off += 1
    nu4 = sol[off: off + B.size]
    tol = _POLISH_TOL
    mu_all = -nu1[ld] + nu2[ls] + nu3 * cost
    ok = (
        PS.min() >= -tol
        and mu_all.min() >= -tol
        and nu3 >= -tol
        and (nu4.size == 0 or nu4.min() >= -tol)
        and (budget_on or float(cost[S] @ PS) <= budget + tol)
        and (ubox is None or z.max() <= ubox + tol)
    )
    if not ok:
        return None, res
    P = np.zeros(m)
    P[S] = PS
    return P, res


_INSIDE_TOL = 1e-10  # scaled units (max |w|, max x <= 1)


def _maybe_inside(x: np.ndarray, w: np.ndarray, box: bool) -> bool:
    """Cheap necessary conditions for ``w`` to lie (numerically) in the ball."""
    scale = max(float(x.max()), float(np.abs(w).max()))
    if float(w.min()) < -1e-12 * scale:
        return False
    if box and float(w.max()) > 1.0 + 1e-12:
        return False
    cx = x.reshape(x.shape[0], -1).sum(axis=1)
    cw = w.reshape(w.shape[0], -1).sum(axis=1)
    return bool(np.all(np.abs(cx - cw) <= 1e-9 * max(float(cx.sum()), 1e-300)))


def _plan_to_pairs(plan, src, dst, n):
    """Scatter a sparse ``(n, n)`` plan onto the pair list ``(src, dst)``."""
    coo = plan.tocoo()
    keys = src * n + dst
    order = np.argsort(keys)
    kk = coo.row.astype(np.int64) * n + coo.col.astype(np.int64)
    pos = np.searchsorted(keys[order], kk)
    pos = np.minimum(pos, keys.size - 1)
    found = keys[order][pos] == kk
    P = np.zeros(src.size)
    P[order[pos[found]]] = coo.data[found]
    return P


# --------------------------------------------------------------------------
# 3. Exact projection (QP, Clarabel)
# --------------------------------------------------------------------------

_CLARABEL_TOLS = (1e-12, 1e-10, 1e-8)


def exact_projection(
    x: Any,
    w: Any,
    eps: float,
    kernel_size: int,
    p: float,
    box: bool = False,
    return_info: bool = False,
    polish: bool = True,
):
    r"""Exact Euclidean projection onto the local Wasserstein ball.

    Solves the convex QP

    .. math::

        \min_{P,\,z}\ \tfrac12 \|z - w\|_2^2
        \quad\text{s.t.}\quad
        z = P^\top\mathbf 1,\quad P\mathbf 1 = x,\quad
        \langle c, P\rangle \le \varepsilon\, m(x),\quad P \ge 0
        \quad(\text{and } z \le 1 \text{ if } \texttt{box}),

    with Clarabel (interior point).  ``z`` is *kept* as a variable (only for
    pixels reachable from the support of ``x``; the others are 0) and tied
    to the plan by sparse equality constraints: this keeps the Hessian
    diagonal (identity on ``z``, zero on ``P``) and the KKT system as
    sparse as the constraint matrix, whereas eliminating ``z`` would give
    the Hessian :math:`A^\top A` with :math:`O(k^4)` non-zeros per column.
    Plan variables exist only for pairs with :math:`x_i > 0`.  Data are
    scaled by :math:`1/\max(\max x, \max|w|)` (the projection is positively
    homogeneous in :math:`(x, w)`; the box bound is scaled accordingly).

    The computation has four steps.

    1. **Inside shortcut.**  If cheap necessary conditions hold (``w >= 0``,
       per-channel masses equal to ``x``'s to ``1e-9``, ``w <= 1`` if
       ``box``), the lexicographic LP of :func:`local_ot_distance` gives a
       plan from ``x`` to ``w``; after the repair of step 4 its column sums
       :math:`\tilde z` are exactly feasible, and if
       :math:`\|\tilde z - w\|_\infty \le 10^{-10}` (scaled units) it is
       returned (status ``"Inside"``): since :math:`\|w - z^\star\| \le
       \|w - \tilde z\|`, :math:`\|\tilde z - z^\star\| \le 2\|\tilde z -
       w\|`.  This makes the projection idempotent to ~1e-15; the QP itself
       is degenerate there (all multipliers vanish).
    2. **Interior point.**  Clarabel with ``tol_gap_abs = tol_gap_rel =
       tol_feas = 1e-12``; if the status is not ``Solved`` (e.g.
       ``AlmostSolved`` at that tolerance) it is retried with ``1e-10`` and
       ``1e-8``; if none is ``Solved``, :class:`ExactSolverError` is raised.
       The objective is 1-strongly convex in ``z``, so an objective gap
       :math:`\delta` only guarantees :math:`\|z - z^\star\| \le
       \sqrt{2\delta}`; observed max-abs errors are ``1e-9 .. 1e-7``.
    3. **Polishing** (``polish=True``, see :func:`_polish_projection`): the
       active set is read off the interior-point solution by strict
       complementarity, the KKT system restricted to it is solved by
       regularized factorization plus iterative refinement, and the result
       is accepted only if it satisfies *all* KKT conditions of the original
       QP (primal feasibility, :math:`P \ge 0`, non-negative reduced costs
       on every pair and multipliers) to ``1e-10``.  This turns the
       interior-point answer into a certified optimum accurate to
       ~``1e-14`` (``info.polished``).  Polishing can fail when strict
       complementarity is numerically absent, typically for ``w`` within
       ~``1e-6`` *outside* the ball; the interior-point answer (accuracy
       ~``1e-6``) is then returned.
    4. **Repair and post-check.**  The plan is made *exactly* feasible
       (clip to :math:`\ge 0`, renormalize rows to ``x``, mix with the
       identity plan if the budget is exceeded); changes are checked to be
       below ``1e-6`` (scaled units) and the returned ``z`` is its
       column-sum vector, so it lies in the ball up to float rounding (and
       ``z <= 1`` up to ``~1e-9`` when ``box=True``).

    Optimality can be certified independently without the box: for any
    feasible ``z``, :math:`\|z - z^\star\|^2 \le \varphi(z) :=
    \max_{v \in B_\varepsilon(x)} \langle w - z, v - z\rangle`, which
    :func:`linear_maximization` evaluates exactly.

    Parameters
    ----------
    x : array_like or torch.Tensor, shape (C, H, W)
        Centre of the ball, entries :math:`\ge 0`.
    w : array_like or torch.Tensor, shape (C, H, W)
        Point to project (any finite real values).
    eps : float
        Radius :math:`\varepsilon \ge 0` in normalized units.
    kernel_size : int
        Odd window size :math:`k \ge 3`.
    p : float
        Cost exponent :math:`p > 0`.
    box : bool, default False
        Also impose :math:`z \le 1` (:math:`z \ge 0` holds automatically).
    return_info : bool, default False
        Also return a :class:`ProjectionInfo`.
    polish : bool, default True
        Run the active-set polishing step (3).

    Returns
    -------
    z : ndarray of float64, shape (C, H, W)
        The projection (``(z, info)`` if ``return_info``).

    Raises
    ------
    ImportError
        Clarabel is not installed (``pip install -e .[test]`` provides it).
    ValueError
        Invalid inputs.
    ExactSolverError
        Clarabel did not solve the QP (e.g. the box-constrained ball is empty
        because ``x`` has pixels above 1 that cannot be spread out), or the
        post-check failed.

    Notes
    -----
    Special cases: :math:`m(x) = 0` gives ``zeros`` (the ball is
    :math:`\{0\}`); :math:`\varepsilon = 0` gives ``x`` (the ball is
    :math:`\{x\}`; with ``box=True`` this requires ``x <= 1``).
    """
    t0 = time.perf_counter()
    k = _check_kernel_size(kernel_size)
    pf = _check_positive_p(p)
    e = _check_eps(eps)
    xa = _check_x(x, "x")
    wa = _check_image(w, "w")
    _check_same_shape(xa, wa, "w")
    box = bool(box)

    xf = xa.ravel()
    wf = wa.ravel()
    n = xf.size
    mass_x = float(xf.sum())

    def _trivial(z):
        if not return_info:
            return z
        info = ProjectionInfo(
            cost=0.0, raw_cost=0.0, distance_sq=float(np.sum((wf - z.ravel()) ** 2)),
            status="Trivial", iterations=0, solve_time=time.perf_counter() - t0,
            repair=0.0, n_variables=0, polished=False, kkt_residual=0.0,
        )
        return z, info

    if mass_x == 0.0:
        return _trivial(np.zeros_like(xa))
    if e == 0.0:
        if box and np.any(xa > 1.0):
            raise ExactSolverError(
                "exact_projection: with eps=0 and box=True the ball {x} violates z <= 1 "
                f"(max x = {xa.max()!r}); the feasible set is empty"
            )
        return _trivial(xa.copy())

    try:
        import clarabel  # noqa: WPS433 (lazy, optional test dependency)
    except ImportError as err:  # pragma: no cover - depends on environment
        raise ImportError(
            "exact_projection needs the 'clarabel' QP solver; "
            "`pip install -e .[test]` provides it"
        ) from err

    src, dst, cost = _window_pairs(xa.shape, k, pf, src_ok=xf > 0)
    diag = _diag_index(src, dst, n)
    alpha = 1.0 / max(float(xf.max()), float(np.abs(wf).max()))
    xs = xf * alpha
    ws = wf * alpha
    budget = e * float(xs.sum())

    # Shortcut: w already (numerically) in the ball -> return a feasible point
    # within _INSIDE_TOL of w.  The QP is degenerate there (all multipliers
    # vanish), which limits interior-point accuracy to ~1e-7.
    if _maybe_inside(xa, wa, box):
        r_in = local_ot_distance(xa, wa, k, pf, return_plan=True)
        Pin = _plan_to_pairs(r_in.plan, src, dst, n) * alpha
        Pin = _repair_plan(Pin, src, cost, xs, budget, diag)
        z_in = np.bincount(dst, weights=Pin, minlength=n)
        gap = float(np.max(np.abs(z_in - ws)))
        if gap <= _INSIDE_TOL and (not box or float(z_in.max()) <= alpha * (1 + 1e-12)):
            z = (z_in / alpha).reshape(xa.shape)
            if not return_info:
                return z
            raw_cost = float(cost @ Pin) / alpha
            return z, ProjectionInfo(
                cost=raw_cost / mass_x, raw_cost=raw_cost,
                distance_sq=float(np.sum((wf - z.ravel()) ** 2)), status="Inside",
                iterations=0, solve_time=time.perf_counter() - t0, repair=gap / alpha,
                n_variables=src.size, polished=False, kkt_residual=0.0,
            )

    used_s, ls = _compress(src)
    used_d, ld = _compress(dst)
    m = src.size
    nz = used_d.size
    nv = m + nz

    # Variables v = [P (m), z (nz)].  Objective 0.5 z'z - w'z.
    Pq = sp.csc_matrix(
        (np.ones(nz), (np.arange(m, m + nz), np.arange(m, m + nz))), shape=(nv, nv)
    )
    q = np.concatenate([np.zeros(m), -ws[used_d]])

    R = _incidence(ls, used_s.size)  # row sums  (rows of P)
    K = _incidence(ld, nz)  # column sums
    blocks = [
        # Zero cone: R P = x ;  z - K P = 0
        sp.hstack([R, sp.csr_matrix((used_s.size, nz))]),
        sp.hstack([-K, sp.identity(nz, format="csr")]),
        # Nonnegative cone: -P <= 0 ; c'P <= budget ; (z <= 1/alpha)
        sp.hstack([-sp.identity(m, format="csr"), sp.csr_matrix((m, nz))]),
        sp.hstack([sp.csr_matrix(cost.reshape(1, -1)), sp.csr_matrix((1, nz))]),
    ]
    b_parts = [xs[used_s], np.zeros(nz), np.zeros(m), np.array([budget])]
    n_nonneg = m + 1
    if box:
        blocks.append(sp.hstack([sp.csr_matrix((nz, m)), sp.identity(nz, format="csr")]))
        b_parts.append(np.full(nz, alpha))
        n_nonneg += nz
    Acon = sp.vstack(blocks).tocsc()
    bcon = np.concatenate(b_parts)
    cones = [clarabel.ZeroConeT(used_s.size + nz), clarabel.NonnegativeConeT(n_nonneg)]

    sol = None
    statuses = []
    for tol in _CLARABEL_TOLS:
        settings = clarabel.DefaultSettings()
        settings.verbose = False
        settings.tol_gap_abs = tol
        settings.tol_gap_rel = tol
        settings.tol_feas = tol
        settings.tol_ktratio = min(1e-6, tol * 100)
        settings.max_iter = 500
        solver = clarabel.DefaultSolver(Pq, q, Acon, bcon, cones, settings)
        s = solver.solve()
        status = str(s.status)
        statuses.append(f"{status} (tol={tol:g}, {s.iterations} it)")
        if status == "Solved":
            sol = s
            break
        if "Infeasible" in status:
            break
    if sol is None:
        hint = ""
        if box and any("Infeasible" in st for st in statuses):
            hint = (
                " The box-constrained ball appears to be empty (x has mass above 1 "
                "that cannot be spread to z <= 1 within the budget)."
            )
        raise ExactSolverError(
            "exact_projection: Clarabel did not solve the projection QP; statuses: "
            + "; ".join(statuses) + "." + hint
        )

    v = np.asarray(sol.x, dtype=np.float64)
    z_solver = np.zeros(n)
    z_solver[used_d] = v[m:]
    P_sol = v[:m]
    polished = False
    kkt_res = float("nan")
    if polish:
        dual = np.asarray(sol.z, dtype=np.float64)
        slack = np.asarray(sol.s, dtype=np.float64)
        o = used_s.size + nz  # first non-negative-cone row
        P_pol, kkt_res = _polish_projection(
            P_sol, v[m:], dual[o:o + m], dual[o + m], slack[o + m],
            dual[o + m + 1:] if box else None, slack[o + m + 1:] if box else None,
            ls, ld, cost, xs[used_s], ws[used_d], budget, alpha if box else None,
            y_col=dual[used_s.size:o], y_row=dual[:used_s.size],
        )
        if P_pol is not None:
            P_sol = P_pol
            polished = True
    Pfix = _repair_plan(P_sol, src, cost, xs, budget, diag)
    zs = np.bincount(dst, weights=Pfix, minlength=n)
    repair = float(np.max(np.abs(zs - z_solver)))

    # Post-checks (scaled units; entries of x and |w| are <= 1 here).
    row_err = float(np.max(np.abs(np.bincount(src, weights=Pfix, minlength=n) - xs)))
    raw_cost_s = float(cost @ Pfix)
    # Unpolished interior-point answers sit ~1e-6 off the constraints on
    # degenerate problems (e.g. real 28x28 digits); beyond 1e-5 something is wrong.
    if repair > 1e-5 or row_err > 1e-9 or raw_cost_s > budget * (1 + 1e-9) + 1e-12:
        raise ExactSolverError(
            "exact_projection: post-check failed (repair change "
            f"{repair:.3g}, row-sum error {row_err:.3g}, cost {raw_cost_s!r} vs budget "
            f"{budget!r}); Clarabel status {statuses[-1]}"
        )
    if box and float(zs.max()) > alpha * (1 + 1e-8):
        raise ExactSolverError(
            f"exact_projection: post-check failed, max z = {zs.max() / alpha!r} > 1"
        )

    z = (zs / alpha).reshape(xa.shape)
    if not return_info:
        return z
    raw_cost = raw_cost_s / alpha
    info = ProjectionInfo(
        cost=raw_cost / mass_x,
        raw_cost=raw_cost,
        distance_sq=float(np.sum((wf - z.ravel()) ** 2)),
        status=str(sol.status),
        iterations=int(sol.iterations),
        solve_time=time.perf_counter() - t0,
        repair=repair / alpha,
        n_variables=nv,
        polished=polished,
        kkt_residual=kkt_res,
    )
    return z, info


# --------------------------------------------------------------------------
# Batched convenience wrappers
# --------------------------------------------------------------------------


def _per_example(val: Any, B: int, name: str) -> List[Any]:
    arr = np.asarray(val.detach().cpu() if hasattr(val, "detach") else val)
    if arr.ndim == 0:
        return [arr.item()] * B
    if arr.shape != (B,):
        raise ValueError(f"{name} must be a scalar or have shape ({B},), got {arr.shape}")
    return [a.item() for a in arr]


def local_ot_distance_batch(
    x: Any, z: Any, kernel_size: int, p: float, return_plan: bool = False
) -> List[TransportResult]:
    """Apply :func:`local_ot_distance` to each pair of a ``(B, C, H, W)`` batch.

    Returns
    -------
    list of TransportResult
        One result per example.
    """
    xa = _check_image(x, "x", ndim=4)
    za = _check_image(z, "z", ndim=4)
    _check_same_shape(xa, za, "z")
    return [
        local_ot_distance(xa[b], za[b], kernel_size, p, return_plan=return_plan)
        for b in range(xa.shape[0])
    ]


def linear_maximization_batch(
    x: Any, g: Any, eps: Any, kernel_size: int, p: float, box: bool = False
) -> Tuple[np.ndarray, np.ndarray]:
    """Apply :func:`linear_maximization` to each example of a ``(B, C, H, W)`` batch.

    ``eps`` may be a scalar or an array of shape ``(B,)``; ``box`` applies to every example.

    Returns
    -------
    values : ndarray of float64, shape (B,)
    z : ndarray of float64, shape (B, C, H, W)
    """
    xa = _check_image(x, "x", ndim=4)
    ga = _check_image(g, "g", ndim=4)
    _check_same_shape(xa, ga, "g")
    B = xa.shape[0]
    eps_list = _per_example(eps, B, "eps")
    vals = np.empty(B)
    zs = np.empty_like(xa)
    for b in range(B):
        vals[b], zs[b] = linear_maximization(xa[b], ga[b], eps_list[b], kernel_size, p, box=box)
    return vals, zs


def exact_projection_batch(
    x: Any, w: Any, eps: Any, kernel_size: int, p: float, box: bool = False
) -> np.ndarray:
    """Apply :func:`exact_projection` to each example of a ``(B, C, H, W)`` batch.

    ``eps`` may be a scalar or an array of shape ``(B,)``.

    Returns
    -------
    z : ndarray of float64, shape (B, C, H, W)
    """
    xa = _check_image(x, "x", ndim=4)
    wa = _check_image(w, "w", ndim=4)
    _check_same_shape(xa, wa, "w")
    B = xa.shape[0]
    eps_list = _per_example(eps, B, "eps")
    out = np.empty_like(xa)
    for b in range(B):
        out[b] = exact_projection(xa[b], wa[b], eps_list[b], kernel_size, p, box=box)
    return out
