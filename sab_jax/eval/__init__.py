"""Evaluation: VQA answer normalisation, accuracy metrics and per-type tables."""
