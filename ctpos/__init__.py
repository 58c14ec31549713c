"""The ``ctpos`` console command: a thin dispatcher over each package's own subcommands."""
