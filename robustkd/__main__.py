"""``python -m robustkd``."""

from robustkd.cli import main

raise SystemExit(main())
