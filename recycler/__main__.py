"""`python -m recycler ...`: the `recycler` command."""

import sys

from recycler.cli import main

sys.exit(main())
