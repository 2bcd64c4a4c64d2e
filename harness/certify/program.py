"""Linear and mixed-integer programs built block by block, and the values of a layer inside one.

The complete certifier (:mod:`.milp`) adds the ball (:meth:`.perturbation.WassersteinBall.encode`) and then
every layer (:meth:`.layers.LayerRule.encoding`) to one :class:`Program`; each step passes the next the
layer's values as :class:`ProgramValues`, affine in the program's variables.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.optimize import Bounds, LinearConstraint, milp

__all__ = [
    "DUAL_FEASIBILITY_TOLERANCE", "MIP_FEASIBILITY_TOLERANCE", "MIP_RELATIVE_GAP", "PRIMAL_FEASIBILITY_TOLERANCE",
    "Program", "ProgramValues",
]

MIP_RELATIVE_GAP = 1e-2
"""Relative gap at which a class's branch and bound stops.

A verdict needs only the sign of each class's minimum, which any gap below 1
preserves; 1% keeps the reported bound close to the optimum without proving
digits nobody reads."""

PRIMAL_FEASIBILITY_TOLERANCE = 1e-7
"""HiGHS's ``primal_feasibility_tolerance`` in the certification programs (its default, set explicitly because the
safety margin of :func:`.milp.highs_error_bound` is computed from it): how far a solution may violate a row or a bound."""

DUAL_FEASIBILITY_TOLERANCE = 1e-7
"""HiGHS's ``dual_feasibility_tolerance`` (its default, set explicitly): how far a reduced cost may have the wrong sign
at an LP optimum, i.e. how much a node's LP bound may overstate the node's minimum per unit of a column's range."""

MIP_FEASIBILITY_TOLERANCE = 1e-6
"""HiGHS's ``mip_feasibility_tolerance`` (its default, set explicitly): how far from 0 or 1 a binary counts as integral."""


class Program:
    """Variables with bounds (some integer) and sparse rows ``lower <= A v <= upper``, added block by block."""

    def __init__(self) -> None:
        self.size = 0
        self.rows = 0
        self._bounds: list[tuple[np.ndarray, np.ndarray, bool]] = []
        self._entries: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._row_bounds: list[tuple[np.ndarray, np.ndarray]] = []

    def add_variables(self, lower, upper, integer: bool = False) -> np.ndarray:
        """New variables with bounds ``lower`` and ``upper`` (arrays or scalars); returns their indices."""
        lower, upper = np.broadcast_arrays(np.asarray(lower, dtype=np.float64), np.asarray(upper, dtype=np.float64))
        index = np.arange(self.size, self.size + lower.size)
        self._bounds.append((lower.ravel().copy(), upper.ravel().copy(), integer))
        self.size += lower.size
        return index

    def add_rows(self, rows, columns, values, lower, upper) -> None:
        r"""Rows :math:`l_r \le \sum_{e:\, \text{rows}_e = r} \text{values}_e\, v_{\text{columns}_e} \le u_r`.

        ``rows`` number the new rows from 0; their count is the length of the
        bound arrays ``lower``, ``upper`` (scalars broadcast against each other).
        """
        lower, upper = np.broadcast_arrays(np.atleast_1d(np.asarray(lower, dtype=np.float64)), np.asarray(upper, dtype=np.float64))
        rows, columns = np.asarray(rows, dtype=np.int64), np.asarray(columns, dtype=np.int64)
        values = np.broadcast_to(np.asarray(values, dtype=np.float64), rows.shape)
        self._entries.append((rows + self.rows, columns, values))
        self._row_bounds.append((lower.copy(), upper.copy()))
        self.rows += lower.size

    def add_sums(self, terms, lower, upper) -> None:
        r"""Rows :math:`l_r \le \sum_t c_{t, r}\, v_{j_{t, r}} \le u_r`, one per position ``r`` of the
        ``(columns j_t, coefficients c_t)`` terms (coefficients and bounds may be scalars)."""
        count = len(terms[0][0])
        self.add_rows(
            np.tile(np.arange(count), len(terms)),
            np.concatenate([columns for columns, _ in terms]),
            np.concatenate([np.broadcast_to(np.asarray(values, dtype=np.float64), (count,)) for _, values in terms]),
            np.broadcast_to(np.asarray(lower, dtype=np.float64), (count,)),
            np.broadcast_to(np.asarray(upper, dtype=np.float64), (count,)),
        )

    def _assembled(self):
        matrix = sp.csr_matrix(
            (
                np.concatenate([values for _, _, values in self._entries]),
                (np.concatenate([rows for rows, _, _ in self._entries]), np.concatenate([cols for _, cols, _ in self._entries])),
            ),
            shape=(self.rows, self.size),
        )
        row_lower = np.concatenate([lower for lower, _ in self._row_bounds])
        row_upper = np.concatenate([upper for _, upper in self._row_bounds])
        lower = np.concatenate([lower for lower, _, _ in self._bounds])
        upper = np.concatenate([upper for _, upper, _ in self._bounds])
        integer = np.concatenate([np.full(lower.size, int(flag)) for lower, _, flag in self._bounds])
        return matrix, row_lower, row_upper, lower, upper, integer

    @property
    def has_integers(self) -> bool:
        return any(flag and lower.size for lower, _, flag in self._bounds)

    def variable_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """The lower and upper bounds of every variable so far."""
        if not self._bounds:
            return np.zeros(0), np.zeros(0)
        return np.concatenate([lower for lower, _, _ in self._bounds]), np.concatenate([upper for _, upper, _ in self._bounds])

    def minimize(self, objective: np.ndarray, time_limit: float, offset: float = 0.0):
        """``min objective . v + offset`` by HiGHS (branch and bound if there are integers); scipy's ``OptimizeResult``.

        The offset rides on a variable fixed at 1, so that HiGHS measures its
        relative gap on the objective itself.
        """
        matrix, row_lower, row_upper, lower, upper, integer = self._assembled()
        options = {
            "time_limit": time_limit, "disp": False, "mip_rel_gap": MIP_RELATIVE_GAP,
            "primal_feasibility_tolerance": PRIMAL_FEASIBILITY_TOLERANCE,
            "dual_feasibility_tolerance": DUAL_FEASIBILITY_TOLERANCE,
            "mip_feasibility_tolerance": MIP_FEASIBILITY_TOLERANCE,
        }
        with warnings.catch_warnings():
            # scipy passes the tolerances to HiGHS verbatim (and checks them there), warning that it does.
            warnings.filterwarnings("ignore", message="Unrecognized options", category=RuntimeWarning)
            result = milp(
                np.append(objective, offset),
                integrality=np.append(integer, 0),
                bounds=Bounds(np.append(lower, 1.0), np.append(upper, 1.0)),
                constraints=LinearConstraint(sp.hstack([matrix, sp.csr_matrix((self.rows, 1))]).tocsr(), row_lower, row_upper),
                options=options,
            )
        if result.x is not None:
            result.x = result.x[:-1]
        return result


@dataclass
class ProgramValues:
    """A layer's values in a program: component ``j`` is ``scale[j] * v[variable[j]] + offset[j]``, or the
    constant ``offset[j]`` where ``variable[j] == -1``; flat, in the order of ``shape``."""

    variable: np.ndarray
    scale: np.ndarray
    offset: np.ndarray
    shape: tuple[int, ...]

    def reshaped(self, shape) -> "ProgramValues":
        return ProgramValues(self.variable, self.scale, self.offset, tuple(shape))
