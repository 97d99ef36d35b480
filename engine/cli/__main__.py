"""`python -m gpuwarden.engine.cli`: the `gpuwarden` command."""

import sys

from gpuwarden.engine.cli import main

sys.exit(main())
