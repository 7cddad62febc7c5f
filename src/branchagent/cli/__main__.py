"""``python -m branchagent.cli``: the ``branchagent`` command."""

import sys

from . import main

sys.exit(main())
