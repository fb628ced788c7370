"""`python -m actsparse.cli`: the same as the `actsparse` command."""

import sys

from actsparse.cli import main

sys.exit(main())
