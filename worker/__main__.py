"""``python -m worker`` is the ``refold`` command."""

from worker.cli import main

raise SystemExit(main())
