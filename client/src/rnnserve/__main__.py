"""`python -m rnnserve` runs the CLI."""

import sys

from rnnserve.cli import main

sys.exit(main())
