"""Post-training binarization of Dense kernels: SAB (arXiv 2607.01876) and baselines.

`core/` holds the pure math (binarize, significance, GPTQ, bit counts, the STE sign),
`providers/` one strategy object per method with its typed parts:
`METHODS[name](**knobs)(kernel, LayerStats) -> Binarized`, whose `parts` own their
dequantizer, storage, kernel planes and QAT form.
"""

from sab_jax.quant.providers import (METHODS, ArbRc, BiLLM, Binarized, LayerStats, Parts, PbLlm,
                                     PbLlmParts, Provider, SalientSplitParts, Sab, Xnor, XnorParts)

__all__ = ["ArbRc", "BiLLM", "Binarized", "LayerStats", "METHODS", "Parts", "PbLlm", "PbLlmParts", "Provider",
           "SalientSplitParts", "Sab", "Xnor", "XnorParts"]
