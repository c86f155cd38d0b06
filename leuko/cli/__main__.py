"""`python -m leuko.cli ...`: the same as the `leuko` command."""

import sys

from leuko.cli.app import main

sys.exit(main())
