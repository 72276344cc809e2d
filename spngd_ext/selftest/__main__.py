"""``python -m spngd_ext.selftest``: see :mod:`spngd_ext.selftest`."""

import sys

from . import main

sys.exit(main())
