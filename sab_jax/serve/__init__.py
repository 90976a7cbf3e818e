"""Serving binarized models from their packed exports (PackedDense, the packed model)."""
