"""``python -m bench.sim ...`` runs ``halfmoon bench sim ...``."""

import sys

from bench.sim import main

sys.exit(main())
