"""Stage 5, evaluation: labelled feature rows (features), the protocol and its splits, heads, metrics with
intervals, the leakage audit, fitting runs (runner, fitting) and predicting (predict)."""
