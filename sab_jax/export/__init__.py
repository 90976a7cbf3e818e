"""Packed 1-bit export: bit packing (`packing`), the format (`manifest`), int8 params
(`int8`), the writer (`writer.export`) and the strict reader (`reader.read` / `reader.load`)."""

from sab_jax.export.manifest import FORMAT_VERSION, provider_from_spec, provider_spec, read_manifest
from sab_jax.export.packing import (compact_parts, decode_parts, encode_parts, expand_parts, pack_bits,
                                    packed_parts, unpack_bits, unpacked_parts)
from sab_jax.export.reader import load, read
from sab_jax.export.writer import export

__all__ = ["FORMAT_VERSION", "compact_parts", "decode_parts", "encode_parts", "expand_parts", "export",
           "load", "pack_bits", "packed_parts", "provider_from_spec", "provider_spec", "read",
           "read_manifest", "unpack_bits", "unpacked_parts"]
