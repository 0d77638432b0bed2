"""The workflow layer: extract, fit, audit and the objects they hand back. The API (:mod:`featcache.api`), the
command line (through the API) and studies are doors over it."""
