"""Post-training binarization of Dense kernels: SAB (arXiv 2607.01876) and baselines.

`core/` holds the pure math (binarize, significance, GPTQ, bit counts), `providers/`
one strategy object per method: `METHODS[name](**knobs)(kernel, LayerStats) -> Binarized`.
"""

from sab_jax.quant.providers import (METHODS, ArbRc, BiLLM, Binarized, LayerStats, PbLlm,
                                     Provider, Sab, Xnor)

__all__ = ["ArbRc", "BiLLM", "Binarized", "LayerStats", "METHODS", "PbLlm", "Provider", "Sab", "Xnor"]
