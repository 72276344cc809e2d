"""``python -m spngd_ext.train``."""

from .cli import main

raise SystemExit(main())
