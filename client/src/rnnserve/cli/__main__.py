"""`python -m rnnserve.cli` runs the CLI, as `python -m rnnserve` does."""

import sys

from rnnserve.cli import main

sys.exit(main())
