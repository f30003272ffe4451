"""``python -m bench.replay ...`` runs ``halfmoon bench replay ...``."""

import sys

from bench.replay import main

sys.exit(main())
