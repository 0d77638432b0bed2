"""Handing a model over: one ONNX graph from images to class probabilities (:mod:`.export`), and
predictions with nothing but ONNX Runtime and featcache's image preprocessing (:mod:`.onnx_predict`)."""
