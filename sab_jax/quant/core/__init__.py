"""Pure numerics of binarization: primitives, significance map, GPTQ loop, bit counts."""
