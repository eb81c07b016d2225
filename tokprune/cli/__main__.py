"""`python -m tokprune.cli`: the `tokprune` command."""

import sys

from tokprune.cli import main

sys.exit(main())
