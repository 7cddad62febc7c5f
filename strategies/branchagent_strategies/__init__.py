"""The built-in strategies of branchagent.

They register in the ``branchagent.strategies`` entry-point group exactly
like third-party plugins, so ``branchagent.get_strategy("speculate")`` finds
them the same way. Import them from :mod:`branchagent` (``ba.Speculate``,
``ba.BestOfN``), the one documented place.
"""

from __future__ import annotations

from .beam import Beam
from .best_of_n import BestOfN
from .cascaded import Cascaded
from .reflexion import Reflexion
from .speculate import Speculate
from .speculative_execution import SpeculativeExecution
from .tournament import Tournament
from .tree_search import TreeSearch

__all__ = ["Beam", "BestOfN", "Cascaded", "Reflexion", "Speculate", "SpeculativeExecution",
           "Tournament", "TreeSearch"]
