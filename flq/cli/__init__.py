"""Command-line entry points: thin typer apps that build a typed config and call one function."""
