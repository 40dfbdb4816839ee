"""The command line: the typer app, shared options, one module per group of commands. Nothing imports it."""
