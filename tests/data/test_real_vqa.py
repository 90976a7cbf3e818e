"""Builds the VQAv2 / GQA TFDS builders on tiny hand-made fixtures, without TensorFlow."""


import numpy as np
import pytest
import tensorflow_datasets as tfds

from data.vqa_fixture import make_gqa, make_vqav2
from sab_jax.data import gqa, vqav2

SMALL = vqav2.VqaConfig(name="test16", image_size=16, description="tiny, for tests")


def _build(cls, manual, data_dir, config=SMALL):
    builder = cls(config=config, data_dir=str(data_dir))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    return builder


def _by_qid(source):
    exs = [vqav2.to_python(source[i]) for i in range(len(source))]
    return {e["question_id"]: e for e in exs}


def test_vqav2_build_and_read_back(tmp_path):
    manual = tmp_path / "manual"
    make_vqav2(manual)
    builder = _build(vqav2.Vqav2, manual, tmp_path / "data")
    assert builder.info.file_format.value == "array_record"
    assert builder.info.splits["train"].num_examples == 3
    assert builder.info.splits["validation"].num_examples == 2
    sources = builder.as_data_source()
    assert set(sources) == {"train", "validation"}
    train = _by_qid(sources["train"])
    assert set(train) == {"9000", "9001", "25000"}

    e = train["9000"]
    assert e["question"] == "What color is the square?"
    assert e["answer"] == "red"
    assert e["answers"] == ["red"] * 8 + ["dark red"] * 2
    assert e["question_type"] == "other"
    assert e["image_id"] == "9"
    img = e["image"]
    assert img.shape == (16, 16, 3) and img.dtype == np.uint8
    assert img[..., 0].mean() > 150 and img[..., 1].mean() < 60  # red survived resizing
    assert train["9001"]["question_type"] == "yes/no"
    num = train["25000"]
    assert num["question_type"] == "number" and num["answer"] == "1"
    assert len(num["answers"]) == 10
    assert num["image"].shape == (16, 16, 3)  # grayscale source became RGB
    assert np.allclose(num["image"].astype(int), 128, atol=3)

    val = _by_qid(sources["validation"])
    assert {k: v["answer"] for k, v in val.items()} == {"42000": "green", "42001": "no"}

    # Reading back through the registered name works too (no TensorFlow).
    src = tfds.data_source("vqav2", split="validation", data_dir=str(tmp_path / "data"),
                           builder_kwargs={"config": SMALL}, download=False)
    assert len(src) == 2


def test_vqav2_original_config_keeps_size(tmp_path):
    manual = tmp_path / "manual"
    make_vqav2(manual)
    builder = _build(vqav2.Vqav2, manual, tmp_path / "data", config="original")
    ex = _by_qid(builder.as_data_source()["train"])
    assert ex["9000"]["image"].shape == (12, 20, 3)
    assert ex["25000"]["image"].shape == (12, 20, 3)


def test_gqa_build_and_read_back(tmp_path):
    manual = tmp_path / "manual"
    make_gqa(manual)
    builder = _build(gqa.Gqa, manual, tmp_path / "data")
    splits = builder.info.splits
    assert {s: splits[s].num_examples for s in splits} == {
        "train": 3, "validation": 1, "testdev": 2}
    train = _by_qid(builder.as_data_source()["train"])
    assert set(train) == {"02930152", "07333408", "1001"}  # string ids keep leading zeros
    e = train["07333408"]
    assert e["answer"] == "blue" and e["answers"] == ["blue"]
    assert e["question_type"] == "query"
    assert e["image_id"] == "2354786"
    assert e["image"].shape == (16, 16, 3)
    assert e["image"][..., 2].mean() > 150
    assert train["1001"]["question_type"] == "choose"
    testdev = _by_qid(builder.as_data_source()["testdev"])
    assert [testdev[k]["answer"] for k in sorted(testdev)] == ["yes", "no"]


@pytest.mark.parametrize("missing", [
    "v2_mscoco_val2014_annotations.json",
    "v2_OpenEnded_mscoco_train2014_questions.json",
    "train2014/COCO_train2014_000000000025.jpg",
])
def test_vqav2_missing_file_is_named(tmp_path, missing):
    manual = tmp_path / "manual"
    make_vqav2(manual)
    (manual / missing).unlink()
    with pytest.raises(vqav2.MissingManualDataError) as err:
        _build(vqav2.Vqav2, manual, tmp_path / "data")
    msg = str(err.value)
    assert str(manual / missing) in msg
    assert "visualqa.org" in msg and "--manual_dir" in msg and "DownloadConfig" in msg


def test_gqa_missing_image_and_manual_dir(tmp_path, capsys):
    manual = tmp_path / "manual"
    make_gqa(manual)
    (manual / "images" / "n161313.jpg").unlink()
    with pytest.raises(gqa.MissingManualDataError, match="n161313.jpg") as err:
        _build(gqa.Gqa, manual, tmp_path / "data")
    assert "GQA" in str(err.value) and "download" in str(err.value).lower()

    # The command line exits non-zero and names the missing folder.
    nowhere = tmp_path / "nowhere"
    rc = vqav2.main(["--manual_dir", str(nowhere), "--data_dir", str(tmp_path / "d2")],
                    builder_cls=gqa.Gqa)
    assert rc == 2
    assert str(nowhere) in capsys.readouterr().err


def test_to_python_decodes_bytes():
    ex = {"question": b"why?", "answers": [b"a", b"b"], "arr": np.array([b"x"], dtype=object),
          "image": np.zeros((2, 2, 3), np.uint8), "n": 3}
    out = vqav2.to_python(ex)
    assert out["question"] == "why?" and out["answers"] == ["a", "b"] and out["arr"] == ["x"]
    assert out["n"] == 3 and out["image"].shape == (2, 2, 3)
