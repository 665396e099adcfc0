"""Thin launchers: flags in, library calls out."""
