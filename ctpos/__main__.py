"""``python -m ctpos``: the same as the ``ctpos`` console command."""
from ctpos.cli import run

run()
