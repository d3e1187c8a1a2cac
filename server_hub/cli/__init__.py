"""The `gkt-hub` command line: argument parsing and the subcommands. Nothing imports it."""
