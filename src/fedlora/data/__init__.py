"""Data sets shipped in packages."""
