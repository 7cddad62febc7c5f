"""The built-in strategies of branchagent.

They register in the ``branchagent.strategies`` entry-point group exactly
like third-party plugins, so ``branchagent.get_strategy("speculate")`` finds
them the same way. Import them from :mod:`branchagent` (``ba.Speculate``,
``ba.BestOfN``), the one documented place. They are written with the public
kit, :mod:`branchagent.strategy`, and nothing else of branchagent's insides.
"""

from __future__ import annotations

# branchagent first: it imports the modules below one by one, so importing one of
# them first (``from branchagent_strategies.beam import Beam``) finds no half-made package.
import branchagent as _branchagent  # noqa: F401

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
