"""Command-line tools beside training: python -m mlplab.commands.<name>."""
