"""The built-in strategies of branchagent.

They register in the ``branchagent.strategies`` entry-point group exactly
like third-party plugins, so ``branchagent.get_strategy("speculate")`` finds
them the same way. Import them from :mod:`branchagent` (``ba.Speculate``,
``ba.BestOfN``), the one documented place.
"""

from __future__ import annotations

from .best_of_n import BestOfN
from .speculate import Speculate

__all__ = ["BestOfN", "Speculate"]
