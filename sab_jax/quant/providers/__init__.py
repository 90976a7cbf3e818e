"""Post-training binarization methods, one strategy object per method, each with its typed parts."""

from sab_jax.quant.providers.base import Binarized, LayerStats, Parts, Provider
from sab_jax.quant.providers.billm import BiLLM
from sab_jax.quant.providers.pbllm import PbLlm, PbLlmParts
from sab_jax.quant.providers.sab import ArbRc, Sab
from sab_jax.quant.providers.salient_split import SalientSplitParts
from sab_jax.quant.providers.xnor import Xnor, XnorParts

# Method name (as in results.json) -> provider class.
METHODS = {"xnor": Xnor, "pbllm": PbLlm, "billm": BiLLM, "arb_rc": ArbRc, "sab": Sab}

__all__ = ["ArbRc", "BiLLM", "Binarized", "LayerStats", "METHODS", "Parts", "PbLlm", "PbLlmParts", "Provider",
           "SalientSplitParts", "Sab", "Xnor", "XnorParts"]
