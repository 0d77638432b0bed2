"""Stage 2, the backbones: the registry (names, poolings, dimensions; no torch import), building a frozen
network with its own preprocessing (models), and its weights (weights)."""
