"""The built-in kinds of grid cells: one attack, an evaluation suite, certificates."""

from .attack import AttackCell
from .certify import CertifyCell
from .suite import SuiteCell

__all__ = ["AttackCell", "CertifyCell", "SuiteCell"]
