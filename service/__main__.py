"""``python -m service`` is ``portal-gateway``."""

import sys

from service.cli import main

sys.exit(main())
