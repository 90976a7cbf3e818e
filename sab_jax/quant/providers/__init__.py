"""Post-training binarization methods, one strategy object per method."""

from sab_jax.quant.providers.base import Binarized, LayerStats, Provider
from sab_jax.quant.providers.billm import BiLLM
from sab_jax.quant.providers.pbllm import PbLlm
from sab_jax.quant.providers.sab import ArbRc, Sab
from sab_jax.quant.providers.xnor import Xnor

# Method name (as in results.json) -> provider class.
METHODS = {"xnor": Xnor, "pbllm": PbLlm, "billm": BiLLM, "arb_rc": ArbRc, "sab": Sab}

__all__ = ["ArbRc", "BiLLM", "Binarized", "LayerStats", "METHODS", "PbLlm", "Provider", "Sab", "Xnor"]
