"""``python -m ctpos``: the same as the ``ctpos`` console command."""
from ctpos.cli import main

raise SystemExit(main())
