"""`python -m elsfast ...`: the same command line as the `elsfast` console script (see `elsfast.cli`)."""

import sys

from .cli import main

sys.exit(main())
