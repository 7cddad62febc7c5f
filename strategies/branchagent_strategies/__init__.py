"""The built-in strategies of branchagent.

They register in the ``branchagent.strategies`` entry-point group exactly
like third-party plugins, so ``branchagent.get_strategy("speculate")`` finds
them the same way. Import them from :mod:`branchagent` (``ba.Speculate``,
``ba.BestOfN``), the one documented place. They are written with the public
kit, :mod:`branchagent.strategy` (and :mod:`branchagent.exceptions`), and
nothing else of branchagent: :mod:`branchagent` imports them only when one of
their names is first asked for, so either package may be imported first.
"""

from __future__ import annotations

from .beam import Beam
from .best_of_n import BestOfN
from .cascaded import Cascaded
from .merge import Merge
from .reflexion import Reflexion
from .speculate import Speculate
from .speculative_execution import SpeculativeExecution
from .tournament import Tournament
from .tree_search import TreeSearch

__all__ = ["Beam", "BestOfN", "Cascaded", "Merge", "Reflexion", "Speculate",
           "SpeculativeExecution", "Tournament", "TreeSearch"]
