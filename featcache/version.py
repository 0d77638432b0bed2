"""featcache's version, declared once: the package metadata (pyproject.toml reads it), run folders, provenance
and warm recipes take it from here, so no module needs the package's top (which hands the API on) for it."""

__version__ = "0.4.0"
