"""The VQA datasets a run can name in `config.data.name`, behind one interface.

The synthetic set is generated on first use; VQAv2 and GQA are built from files the user
downloaded by hand (`manual_dir`), so a run never starts a multi-hour build by surprise:
without `manual_dir` an unbuilt dataset is an error that names the build command.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

from sab_jax.data import synthetic_vqa


@dataclasses.dataclass(frozen=True)
class Dataset:
  # Values of the records' `question_type`, in the order of the per-type tables.
  question_types: tuple[str, ...]
  # The standard metric (sab_jax.eval.vqa.METRICS).
  metric: str
  # () -> the TFDS builder class (imported lazily: the real-data builders pull in more).
  builder: Callable[[], Any]
  # Built from `manual_dir` (True) or generated (False).
  manual: bool


def _vqav2():
  from sab_jax.data import vqav2
  return vqav2.Vqav2


def _gqa():
  from sab_jax.data import gqa
  return gqa.Gqa


DATASETS: dict[str, Dataset] = {
    "synthetic_vqa": Dataset(synthetic_vqa.QUESTION_TYPES, "exact_match", lambda: synthetic_vqa.SyntheticVqa,
                             manual=False),
    # VQAv2's `answer_type`.
    "vqav2": Dataset(("yes/no", "number", "other"), "vqav2", _vqav2, manual=True),
    # GQA's structural type.
    "gqa": Dataset(("verify", "query", "choose", "logical", "compare"), "exact_match", _gqa, manual=True),
}


def get(name: str) -> Dataset:
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r} in config.data.name; available: {sorted(DATASETS)}")
  return DATASETS[name]


def load(name: str, builder_config: str, data_dir: str, manual_dir: str | None = None):
  """The prepared TFDS builder of `name/builder_config` under `data_dir`.

  Generates the synthetic set if needed; builds VQAv2/GQA only when `manual_dir` is
  given, and otherwise refuses with the command that builds them.
  """
  dataset = get(name)
  builder = dataset.builder()(config=builder_config, data_dir=os.fspath(data_dir))
  if not dataset.manual:
    builder.download_and_prepare()
  elif not builder.is_prepared():
    if not manual_dir:
      raise FileNotFoundError(
          f"{name}/{builder_config} is not built under {data_dir}. Build it once from the downloaded files with "
          f"`python -m sab_jax.data.{name} --manual_dir=DIR --data_dir={data_dir} --config={builder_config}`, "
          f"or set --config.data.manual_dir=DIR to build it in this run (--config.data.data_dir picks where).")
    import tensorflow_datasets as tfds
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder
