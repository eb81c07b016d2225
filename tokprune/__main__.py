"""`python -m tokprune`: the `tokprune` command, as the installed script runs it."""

import sys

from tokprune.cli import main

if __name__ == "__main__":
    sys.exit(main())
