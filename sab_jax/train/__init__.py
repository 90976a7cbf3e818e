"""Training: the full-precision teacher now; distillation of the binarized student later."""
