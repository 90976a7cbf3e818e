"""Calibration: modality-split Hessians of every Dense layer's inputs, layer by layer."""
