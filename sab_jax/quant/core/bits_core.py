"""Bit accounting: the papers' nominal bits and every bit actually stored.

`nominal_bits` counts what the papers count (sign planes, and PB-LLM's 8-bit salient
values); `stored_bits` counts everything an exporter must write to rebuild Ŵ exactly:
sign planes (1 bit per stored sign), residual planes, per-weight group bitmaps,
salient-row flags, positions of PB-LLM's salient values, and every scale / offset at
16 bits (bfloat16). `bits_per_weight = stored_bits / (in · out)`.

Where a set of positions can be stored as a bitmap or as an index list, the cheaper
is counted: `min(slots, marked · ceil(log2 slots))`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

# Bits per stored scale, offset or per-row factor (bfloat16).
SCALE_BITS = 16


@dataclasses.dataclass(frozen=True)
class BitCount:
  """Bits of one layer."""
  nominal_bits: float  # bits/weight as the papers count them
  stored_bits: int     # every stored bit
  n_weights: int       # in · out

  @property
  def bits_per_weight(self) -> float:
    return self.stored_bits / self.n_weights


def bits_per_weight(stored_bits: int, shape: Sequence[int]) -> float:
  """`stored_bits / (in · out)`."""
  return stored_bits / math.prod(shape)


def positions_bits(n_marked: int, n_slots: int) -> int:
  """Cheaper of a bitmap (1 bit per slot) and an index list (ceil(log2 slots) each)."""
  if n_slots <= 1:
    return 0
  return min(n_slots, n_marked * math.ceil(math.log2(n_slots)))


def xnor_bits(n_in: int, n_out: int) -> BitCount:
  """XNOR: nominal 1; stored = signs `in·out` + alpha_out `16·out`."""
  n = n_in * n_out
  return BitCount(1.0, n + SCALE_BITS * n_out, n)


def pbllm_bits(n_in: int, n_out: int, *, n_salient: int, salient_bits: int,
               n_blocks: int) -> BitCount:
  """PB-LLM: `n_salient` weights at `salient_bits`, the rest binarized.

  nominal = ((N − n_sal)·1 + n_sal·salient_bits) / N   (PB-LLM's count).
  stored = (N − n_sal) signs + n_sal·salient_bits values
         + positions of the salient weights (bitmap or index list, the cheaper)
         + per block and output channel: int scale and binary alpha, 2·16 bits each.
  """
  n = n_in * n_out
  nominal = ((n - n_salient) + n_salient * salient_bits) / n
  stored = ((n - n_salient) + n_salient * salient_bits + positions_bits(n_salient, n)
            + n_blocks * 2 * n_out * SCALE_BITS)
  return BitCount(nominal, stored, n)


def salient_split_bits(n_in: int, n_out: int, *, block_rows: Sequence[int],
                       salient_per_block: Sequence[int], mode: str, split: bool,
                       salient_groups: bool = False) -> BitCount:
  """BiLLM / ARB-RC / SAB: salient rows with a residual plane, the rest 1 or 2 groups.

  nominal = 1 + n_sal_rows / in   (the sign plane plus the salient rows' residual
            plane, the papers' ~1.08 count).
  stored  = in·out signs
          + n_sal_rows·out residual signs
          + per block: salient-row positions, min(rows, n_sal·ceil(log2 rows))
          + (split) 1 bit per weight of the non-salient rows (group bitmap)
          + (salient_groups) 1 bit per weight of the salient rows (their group bitmap)
          + per block: C·out alpha_out at 16 bits, C = 3 (order1, order2, rest), + 1 with
            split (lo, hi), + 2 with salient groups (order1', order2')
          + mode "rc": alpha_in at 16 bits, 2 per row with split (order1/order2 or
            lo/hi), else 2 per salient row and 1 per other row; + 2 per salient row with
            salient groups
          + mode "mean_offset": C·out offsets mu per block at 16 bits.

  Args:
    n_in, n_out: kernel shape.
    block_rows: real (unpadded) rows of each block.
    salient_per_block: salient rows of each block.
    mode: "rc" or "mean_offset".
    split: bell-shaped split of the non-salient rows (per-weight bitmap).
    salient_groups: the salient rows' entries in two groups (per-weight bitmap, 2 more
      scale pairs).
  """
  n = n_in * n_out
  n_blocks = len(block_rows)
  n_sal = int(sum(salient_per_block))
  c = 3 + split + 2 * salient_groups
  stored = n + n_sal * n_out
  stored += sum(positions_bits(s, r) for s, r in zip(salient_per_block, block_rows))
  if split:
    stored += (n_in - n_sal) * n_out
  if salient_groups:
    stored += n_sal * n_out
  stored += n_blocks * c * n_out * SCALE_BITS
  if mode == "rc":
    stored += ((2 * n_in if split else n_in + n_sal) + 2 * n_sal * salient_groups) * SCALE_BITS
  elif mode == "mean_offset":
    stored += n_blocks * c * n_out * SCALE_BITS
  else:
    raise ValueError(f"unknown mode {mode!r}")
  return BitCount(1.0 + n_sal / n_in, stored, n)


def block_rows(n_in: int, block_size: int) -> list[int]:
  """Real rows of each block of `block_size` inputs (last one may be partial)."""
  return [min(block_size, n_in - i) for i in range(0, n_in, block_size)]
