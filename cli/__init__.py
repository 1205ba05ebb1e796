"""Entry points: the `recsys` command line and the demo (they use the applications)."""
