"""`python -m transformers_blip.cli`: the `blip` command without the console script."""

import sys

from . import main

sys.exit(main())
