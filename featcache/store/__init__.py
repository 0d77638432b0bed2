"""Stage 4, the store: cache entries (entries), run folders (runs), the names of everything on disk (naming),
fused entries, checks and repairs (verify)."""
