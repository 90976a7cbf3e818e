"""VQAv2 as a TFDS builder that works without TensorFlow.

The builder reads the files users download by hand from the official VQA site
(https://visualqa.org/download.html) and the COCO 2014 images
(https://cocodataset.org/#download), laid out under ``manual_dir`` as::

    manual_dir/
      v2_OpenEnded_mscoco_train2014_questions.json
      v2_OpenEnded_mscoco_val2014_questions.json
      v2_mscoco_train2014_annotations.json
      v2_mscoco_val2014_annotations.json
      train2014/COCO_train2014_000000000009.jpg ...
      val2014/COCO_val2014_000000000042.jpg ...

It writes ``array_record`` files (the default for these builders, TFRecord needs
TensorFlow) and is read back with ``builder.as_data_source()`` /
``tfds.data_source`` (``as_dataset()`` needs TensorFlow). Build with::

    python -m sab_jax.data.vqav2 --manual_dir=DIR --data_dir=DATA_DIR [--config=res336]

or in Python::

    b = Vqav2(config="res336", data_dir=DATA_DIR)
    b.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=DIR))
    src = b.as_data_source()["validation"]

Each example is one question:

* ``image``: uint8 ``[H, W, 3]`` (stored as JPEG, decoded with Pillow on read).
  Config ``res336`` (default, LLaVA-1.5's CLIP-L/14-336 input) and ``res224``
  resize every image to a square (aspect ratio not kept, nothing cropped away:
  VQA questions may be about any part of the image); ``original`` keeps the
  original JPEG bytes. VQAv2 has ~5 questions per image and every example holds
  its own copy of the image, so ``original`` costs ~70 GB for train; ``res336``
  about a fifth of that.
* ``question``, ``answer`` (the annotation's ``multiple_choice_answer``, the most
  common of the 10 human answers), ``answers`` (the 10 human answers, for
  :func:`sab_jax.eval.metrics.vqav2_accuracy`), ``question_type`` (the
  annotation's ``answer_type``: ``yes/no``, ``number`` or ``other``),
  ``question_id`` and ``image_id`` (as decimal strings, so that VQAv2 and GQA,
  whose ids are strings, share one schema).

Text fields come back as ``bytes`` from the data source; :func:`to_python`
turns an example's text fields into ``str``.

The shared machinery (configs, image encoding, manual-dir checks, the build CLI)
lives here and is reused by :mod:`sab_jax.data.gqa`.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import utils as tfds_utils
from PIL import Image

__all__ = [
    "MissingManualDataError",
    "VqaConfig",
    "Vqav2",
    "VQAV2_FILES",
    "build",
    "main",
    "to_python",
    "vqa_features",
]

# Keep this many missing paths in an error message.
_MAX_LISTED = 10


class MissingManualDataError(FileNotFoundError):
    """A file the builder needs is not under ``manual_dir``.

    The message names the missing path(s), where to download them from and where
    to put them.
    """


@dataclasses.dataclass(eq=False)
class VqaConfig(tfds.core.BuilderConfig):
    """Builder config of the real-data VQA builders.

    Attributes:
      image_size: side of the square every image is resized to (bicubic,
        aspect ratio not kept), or ``None`` to keep the original image.
      jpeg_quality: JPEG quality of re-encoded images.
    """

    image_size: int | None = 336
    jpeg_quality: int = 90


def default_configs(dataset: str) -> list[VqaConfig]:
    return [
        VqaConfig(name="res336", image_size=336,
                  description=f"{dataset}, images resized to 336x336 (LLaVA-1.5 CLIP-L/14-336)."),
        VqaConfig(name="res224", image_size=224,
                  description=f"{dataset}, images resized to 224x224."),
        VqaConfig(name="original", image_size=None,
                  description=f"{dataset}, original images (large: one copy per question)."),
    ]


def vqa_features(image_size: int | None) -> tfds.features.FeaturesDict:
    """The example schema shared by :class:`Vqav2` and ``Gqa``."""
    shape = (image_size, image_size, 3) if image_size else (None, None, 3)
    return tfds.features.FeaturesDict({
        # Given encoded JPEG bytes, `Image` stores them as they are; on read the
        # data source decodes them with Pillow (OpenCV when installed). No TF.
        "image": tfds.features.Image(shape=shape, dtype=np.uint8, encoding_format="jpeg"),
        "image_id": tfds.features.Text(),
        "question_id": tfds.features.Text(),
        "question": tfds.features.Text(),
        "answer": tfds.features.Text(),
        "answers": tfds.features.Sequence(tfds.features.Text()),
        "question_type": tfds.features.Text(),
    })


class Record(NamedTuple):
    """One question, before its image is read."""

    question_id: str
    image_id: str
    image_path: epath.Path
    question: str
    answer: str
    answers: tuple[str, ...]
    question_type: str


def encode_image(path: epath.Path, image_size: int | None, jpeg_quality: int = 90) -> bytes:
    """Reads an image file and returns RGB JPEG bytes, resized to a square if asked.

    An RGB JPEG kept at its original size is passed through byte for byte;
    grayscale/CMYK/PNG images are converted to RGB JPEG so that every stored image
    decodes to ``[H, W, 3]``.
    """
    data = epath.Path(path).read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        if image_size is None and im.format == "JPEG" and im.mode == "RGB":
            return data
        im = im.convert("RGB")
        if image_size is not None and im.size != (image_size, image_size):
            im = im.resize((image_size, image_size), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=jpeg_quality)
        return buf.getvalue()


def manual_data_message(dataset: str, missing: Sequence[Any], manual_dir: Any,
                        instructions: str) -> str:
    """The text of a :class:`MissingManualDataError`: what is missing, where to get it."""
    listed = "\n".join(f"  {p}" for p in list(missing)[:_MAX_LISTED])
    more = len(missing) - _MAX_LISTED
    if more > 0:
        listed += f"\n  ... and {more} more"
    what = "path" if len(missing) == 1 else f"{len(missing)} paths"
    return (
        f"{dataset}: missing {what} that must be downloaded by hand:\n{listed}\n\n"
        f"{instructions.strip()}\n\n"
        f"Put them under one manual directory (here: {manual_dir}) and point the builder "
        f"at it: `python -m sab_jax.data.{dataset.lower()} --manual_dir=DIR --data_dir=OUT`, "
        "or in Python `builder.download_and_prepare(download_config="
        "tfds.download.DownloadConfig(manual_dir=DIR))`. (`tfds build` needs TensorFlow.)"
    )


def resolve_manual_dir(dl_manager: Any, dataset: str, instructions: str) -> epath.Path:
    """``dl_manager``'s manual dir, or a :class:`MissingManualDataError` naming it."""
    # `dl_manager.manual_dir` raises a bare AssertionError; read the path itself so
    # that the error can name it (TFDS defaults it to DATA_DIR/downloads/manual).
    path = getattr(dl_manager, "_manual_dir", None)
    if not path:
        raise MissingManualDataError(manual_data_message(
            dataset, ["<manual_dir> (no manual directory configured)"], None, instructions))
    path = epath.Path(path)
    if not path.is_dir():
        raise MissingManualDataError(manual_data_message(dataset, [path], path, instructions))
    return path


def check_files(dataset: str, manual_dir: epath.Path, paths: Iterable[epath.Path],
                instructions: str, image_dirs: Iterable[epath.Path] = ()) -> None:
    """Raises :class:`MissingManualDataError` listing every path that is missing.

    Files in ``image_dirs`` are checked against one directory listing each
    (a ``stat`` per image would be slow on network file systems).
    """
    image_dirs = set(image_dirs)
    missing: list[epath.Path] = []
    listings: dict[epath.Path, set[str] | None] = {}
    for p in paths:
        parent = p.parent
        if parent in image_dirs or parent in listings:
            if parent not in listings:
                listings[parent] = ({c.name for c in parent.iterdir()}
                                    if parent.is_dir() else None)
            listing = listings[parent]
            if listing is None:
                if parent not in missing:
                    missing.append(parent)
            elif p.name not in listing:
                missing.append(p)
        elif not p.exists():
            missing.append(p)
    if missing:
        raise MissingManualDataError(
            manual_data_message(dataset, missing, manual_dir, instructions))


class VqaBuilderBase(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes ``array_record`` by default and generates from :class:`Record` lists."""

    BUILDER_CONFIGS: list[VqaConfig] = []

    def __init__(self, *, file_format: str | None = None, **kwargs):
        # TFRecord (the TFDS default) needs TensorFlow; array_record does not.
        super().__init__(file_format=file_format or "array_record", **kwargs)

    @tfds_utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path | None:
        # TFDS 4.9.10's own lookup touches `importlib_resources` (a backport TFDS
        # does not install) for any builder defined outside TFDS; the file the
        # class is defined in is what it would compute anyway.
        try:
            return epath.Path(inspect.getfile(cls))
        except (TypeError, OSError):
            return None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=vqa_features(self.builder_config.image_size),
            homepage=getattr(self, "HOMEPAGE", None),
            citation=getattr(self, "CITATION", None),
        )

    def _generate_examples(self, records: list[Record]) -> Iterator[tuple[str, dict]]:
        cfg = self.builder_config
        # Questions on the same image come together: encode each image once.
        records = sorted(records, key=lambda r: (str(r.image_path), r.question_id))
        last_path, last_bytes = None, b""
        for r in records:
            if r.image_path != last_path:
                last_path = r.image_path
                last_bytes = encode_image(r.image_path, cfg.image_size, cfg.jpeg_quality)
            yield r.question_id, {
                "image": last_bytes,
                "image_id": r.image_id,
                "question_id": r.question_id,
                "question": r.question,
                "answer": r.answer,
                "answers": list(r.answers),
                "question_type": r.question_type,
            }


# split -> (questions json, annotations json, image folder, image file name pattern)
VQAV2_FILES = {
    "train": ("v2_OpenEnded_mscoco_train2014_questions.json",
              "v2_mscoco_train2014_annotations.json",
              "train2014", "COCO_train2014_{:012d}.jpg"),
    "validation": ("v2_OpenEnded_mscoco_val2014_questions.json",
                   "v2_mscoco_val2014_annotations.json",
                   "val2014", "COCO_val2014_{:012d}.jpg"),
}

_VQAV2_INSTRUCTIONS = """\
Download VQAv2 from the official VQA download page (https://visualqa.org/download.html):
"Training questions 2017 v2.0", "Validation questions 2017 v2.0", "Training annotations
2017 v2.0" and "Validation annotations 2017 v2.0" (unzip them: v2_OpenEnded_mscoco_
{train,val}2014_questions.json, v2_mscoco_{train,val}2014_annotations.json), and the COCO
2014 images from the COCO download page (https://cocodataset.org/#download): "2014 Train
images" and "2014 Val images" (unzip them to train2014/ and val2014/)."""


def _load_vqav2_split(manual_dir: epath.Path, split: str) -> list[Record]:
    q_name, a_name, image_dir, pattern = VQAV2_FILES[split]
    questions = json.loads((manual_dir / q_name).read_text())["questions"]
    annotations = json.loads((manual_dir / a_name).read_text())["annotations"]
    by_qid = {a["question_id"]: a for a in annotations}
    del annotations
    records = []
    for q in questions:
        a = by_qid.get(q["question_id"])
        if a is None:
            raise ValueError(f"{manual_dir / a_name} has no annotation for question_id "
                             f"{q['question_id']} of {manual_dir / q_name}")
        records.append(Record(
            question_id=str(q["question_id"]),
            image_id=str(q["image_id"]),
            image_path=manual_dir / image_dir / pattern.format(int(q["image_id"])),
            question=q["question"],
            answer=a["multiple_choice_answer"],
            answers=tuple(x["answer"] for x in a["answers"]),
            question_type=a["answer_type"],
        ))
    return records


class Vqav2(VqaBuilderBase, skip_registration=__name__ == "__main__"):
    """VQAv2 (Goyal et al., 2017): open-ended questions on COCO 2014 images."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: train/validation from manual_dir."}
    BUILDER_CONFIGS = default_configs("VQAv2")
    MANUAL_DOWNLOAD_INSTRUCTIONS = _VQAV2_INSTRUCTIONS
    HOMEPAGE = "https://visualqa.org/"
    CITATION = """\
@inproceedings{goyal2017making,
  title={Making the {V} in {VQA} Matter: Elevating the Role of Image Understanding in
         Visual Question Answering},
  author={Goyal, Yash and Khot, Tejas and Summers-Stay, Douglas and Batra, Dhruv and
          Parikh, Devi},
  booktitle={CVPR}, year={2017}}"""

    def _split_generators(self, dl_manager):
        manual_dir = resolve_manual_dir(dl_manager, "VQAv2", _VQAV2_INSTRUCTIONS)
        # First every json file, so that one error names all of them.
        json_files = [manual_dir / name for q, a, _, _ in VQAV2_FILES.values()
                      for name in (q, a)]
        check_files("VQAv2", manual_dir, json_files, _VQAV2_INSTRUCTIONS)
        records = {split: _load_vqav2_split(manual_dir, split) for split in VQAV2_FILES}
        # Then the images the questions refer to, before anything is written.
        check_files("VQAv2", manual_dir,
                    (r.image_path for rs in records.values() for r in rs),
                    _VQAV2_INSTRUCTIONS,
                    image_dirs=[manual_dir / d for _, _, d, _ in VQAV2_FILES.values()])
        return {split: self._generate_examples(rs) for split, rs in records.items()}


def to_python(example: dict[str, Any]) -> dict[str, Any]:
    """Decodes an example's ``bytes`` text fields (as the data source returns them) to str."""

    def dec(v):
        if isinstance(v, (bytes, np.bytes_)):
            return bytes(v).decode("utf-8")
        if isinstance(v, np.ndarray) and v.dtype == object:
            return [dec(x) for x in v.tolist()]
        if isinstance(v, (list, tuple)):
            return [dec(x) for x in v]
        return v

    return {k: dec(v) for k, v in example.items()}


def build(builder_cls: type[VqaBuilderBase], manual_dir: str, data_dir: str | None = None,
          config: str | None = None) -> tfds.core.DatasetBuilder:
    """Builds ``builder_cls`` from ``manual_dir`` into ``data_dir``; returns the builder."""
    builder = builder_cls(config=config, data_dir=data_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return builder


def main(argv: Sequence[str] | None = None, builder_cls: type[VqaBuilderBase] = Vqav2) -> int:
    """``python -m sab_jax.data.{vqav2,gqa}``: build from --manual_dir; exit 2 if files are missing."""
    configs = [c.name for c in builder_cls.BUILDER_CONFIGS]
    parser = argparse.ArgumentParser(
        prog=f"python -m {builder_cls.__module__}",
        description=f"Build the {builder_cls.name} TFDS dataset (array_record) from hand-"
                    "downloaded files.")
    parser.add_argument("--manual_dir", required=True,
                        help="folder with the downloaded files (see the module docstring)")
    parser.add_argument("--data_dir", default=None, help="TFDS data dir to write to")
    parser.add_argument("--config", default=configs[0], choices=configs)
    args = parser.parse_args(argv)
    try:
        builder = build(builder_cls, args.manual_dir, args.data_dir, args.config)
    except MissingManualDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for split, info in builder.info.splits.items():
        print(f"{builder.name}/{args.config} {split}: {info.num_examples} examples")
    print(f"written to {builder.data_dir}")
    return 0


if __name__ == "__main__":
    # Run as a script, this module's classes are not registered with TFDS (that would
    # clash with the copy imported as `sab_jax.data.vqav2`); build with that copy.
    from sab_jax.data import vqav2 as _registered

    sys.exit(_registered.main(builder_cls=_registered.Vqav2))
