"""dist-bn-bench: `cli` is the command line, `sections` the measurements it runs."""
