"""Packed 1-bit export: bit packing (`packing`) and the orbax checkpoint + manifest (`checkpoint`)."""

from sab_jax.export.checkpoint import FORMAT_VERSION, export, load, read_manifest
from sab_jax.export.packing import (compact_parts, decode_parts, encode_parts, expand_parts, pack_bits,
                                    packed_parts, unpack_bits, unpacked_parts)

__all__ = ["FORMAT_VERSION", "compact_parts", "decode_parts", "encode_parts", "expand_parts", "export",
           "load", "pack_bits", "packed_parts", "read_manifest", "unpack_bits", "unpacked_parts"]
