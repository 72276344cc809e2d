"""``python -m spngd_ext.bench``: see :mod:`spngd_ext.bench`."""

import sys

from . import main

sys.exit(main())
