"""featcache: frozen-backbone features cached once, light heads compared honestly."""

__version__ = "0.2.0"
