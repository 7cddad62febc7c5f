"""``python -m branchagent``: the ``branchagent`` command."""

import sys

from .cli import main

sys.exit(main())
