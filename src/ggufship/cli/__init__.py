"""The ``ggufship`` command line: one subcommand module per stage."""
