"""GQA (balanced) as a TFDS builder that works without TensorFlow.

Reads the files users download by hand from the official GQA download page
(https://cs.stanford.edu/people/dorarad/gqa/download.html), laid out under
``manual_dir`` as::

    manual_dir/
      questions/train_balanced_questions.json
      questions/val_balanced_questions.json
      questions/testdev_balanced_questions.json
      images/<imageId>.jpg

Each questions file maps a question id to ``{"imageId", "question", "answer",
"types": {"structural", "semantic", "detailed"}, ...}``. Splits: ``train``,
``validation`` and ``testdev`` (the split papers report GQA numbers on).

The example schema is the one of :mod:`sab_jax.data.vqav2` (``image``,
``image_id``, ``question_id``, ``question``, ``answer``, ``answers``,
``question_type``), with ``answers = [answer]`` and ``question_type`` the
question's structural type (``verify``, ``query``, ``choose``, ``logical``,
``compare``). GQA is scored by exact match
(:func:`sab_jax.eval.metrics.exact_match`). Configs (``res336`` default,
``res224``, ``original``), storage format and reading back are as for VQAv2;
every example stores its own copy of the image and train_balanced has ~943k
questions on ~72k images, so prefer ``res224``/``res336`` (tens of GB) to
``original``.
Build with::

    python -m sab_jax.data.gqa --manual_dir=DIR --data_dir=DATA_DIR [--config=res336]
"""

from __future__ import annotations

import json
import sys

import tensorflow_datasets as tfds
from etils import epath

from sab_jax.data.vqav2 import (
    MissingManualDataError,
    Record,
    VqaBuilderBase,
    check_files,
    default_configs,
    main,
    resolve_manual_dir,
)

__all__ = ["Gqa", "GQA_FILES", "MissingManualDataError"]

# split -> questions file (under manual_dir)
GQA_FILES = {
    "train": "questions/train_balanced_questions.json",
    "validation": "questions/val_balanced_questions.json",
    "testdev": "questions/testdev_balanced_questions.json",
}
GQA_IMAGE_DIR = "images"

_GQA_INSTRUCTIONS = """\
Download GQA from the official GQA download page
(https://cs.stanford.edu/people/dorarad/gqa/download.html): "Questions and Answers"
(questions1.2.zip; put train_balanced_questions.json, val_balanced_questions.json and
testdev_balanced_questions.json in questions/) and "Images" (images.zip; unzip it so
that the images are images/<imageId>.jpg)."""


def _load_gqa_split(manual_dir: epath.Path, split: str) -> list[Record]:
    path = manual_dir / GQA_FILES[split]
    questions = json.loads(path.read_text())
    records = []
    for qid, q in questions.items():
        records.append(Record(
            question_id=str(qid),
            image_id=str(q["imageId"]),
            image_path=manual_dir / GQA_IMAGE_DIR / f"{q['imageId']}.jpg",
            question=q["question"],
            answer=q["answer"],
            answers=(q["answer"],),
            question_type=q["types"]["structural"],
        ))
    return records


class Gqa(VqaBuilderBase, skip_registration=__name__ == "__main__"):
    """GQA balanced (Hudson & Manning, 2019): compositional questions on Visual Genome images."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: balanced train/validation/testdev from manual_dir."}
    BUILDER_CONFIGS = default_configs("GQA")
    MANUAL_DOWNLOAD_INSTRUCTIONS = _GQA_INSTRUCTIONS
    HOMEPAGE = "https://cs.stanford.edu/people/dorarad/gqa/"
    CITATION = """\
@inproceedings{hudson2019gqa,
  title={{GQA}: A New Dataset for Real-World Visual Reasoning and Compositional Question
         Answering},
  author={Hudson, Drew A and Manning, Christopher D},
  booktitle={CVPR}, year={2019}}"""

    def _split_generators(self, dl_manager):
        manual_dir = resolve_manual_dir(dl_manager, "GQA", _GQA_INSTRUCTIONS)
        check_files("GQA", manual_dir, [manual_dir / f for f in GQA_FILES.values()],
                    _GQA_INSTRUCTIONS)
        records = {split: _load_gqa_split(manual_dir, split) for split in GQA_FILES}
        check_files("GQA", manual_dir, (r.image_path for rs in records.values() for r in rs),
                    _GQA_INSTRUCTIONS, image_dirs=[manual_dir / GQA_IMAGE_DIR])
        return {split: self._generate_examples(rs) for split, rs in records.items()}


if __name__ == "__main__":
    # Run as a script, this module's classes are not registered with TFDS (that would
    # clash with the copy imported as `sab_jax.data.gqa`); build with that copy.
    from sab_jax.data import gqa as _registered

    sys.exit(main(builder_cls=_registered.Gqa))
