"""Stage 3, extraction: running a backbone once over a source into a cache entry, resumable; locally   (extract,
loader, writer) or on Ray (ray), on PyTorch, ONNX Runtime or OpenVINO (engines)."""
