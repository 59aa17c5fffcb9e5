"""The cowblock command line (cowblock.cli.main)."""
