"""``python -m jaxdiff``: the command line (see ``jaxdiff.cli``)."""

import sys

from jaxdiff.cli import main

sys.exit(main())
