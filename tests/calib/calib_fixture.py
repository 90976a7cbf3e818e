"""Hand-made calibration batches for the tiny test LVLM: [pad, pad, bos, images, 6 text tokens]."""

import numpy as np

IMG = 3


def batches(cfg, n=2, b=8, seed=0, answers=False):
  """Some rows padded one token more; with `answers`, the last 3 text positions are answer
  positions (`loss_mask`, as the data pipeline marks them)."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    text = rng.integers(5, cfg.text.vocab_size, size=(b, 6))
    ids = np.concatenate([np.zeros((b, 2)), np.ones((b, 1)), np.full((b, cfg.num_image_tokens), IMG), text], axis=1)
    mask = (np.arange(ids.shape[1])[None] >= 2).repeat(b, 0).astype(np.int32)
    mask[::2, 2] = 0  # some rows are padded one token more
    ids = np.where(mask > 0, ids, 0).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": mask,
             "pixel_values": rng.normal(size=(b, 32, 32, 3)).astype(np.float32)}
    if answers:
      batch["loss_mask"] = np.zeros(ids.shape, np.float32)
      batch["loss_mask"][:, -4:-1] = 1.0
    out.append(batch)
  return out
