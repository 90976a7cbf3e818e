"""Hand-made VQAv2 / GQA files in the layouts users download (tests build them themselves)."""

import json

from PIL import Image


def _save_image(path, color, mode="RGB", size=(20, 12), fmt="JPEG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new(mode, size, color)
    img.save(path, format=fmt)


def _answers(*pairs):
    """[(answer, count), ...] -> the annotation's 10 answer dicts."""
    out = [a for a, n in pairs for _ in range(n)]
    assert len(out) == 10
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(out)]


def make_vqav2(root):
    """train: 3 questions on 2 images (one grayscale); validation: 2 questions on 1 image."""
    _save_image(root / "train2014" / "COCO_train2014_000000000009.jpg", (200, 10, 10))
    _save_image(root / "train2014" / "COCO_train2014_000000000025.jpg", 128, mode="L")
    _save_image(root / "val2014" / "COCO_val2014_000000000042.jpg", (10, 200, 10))
    train_q = [
        {"image_id": 9, "question": "What color is the square?", "question_id": 9000},
        {"image_id": 9, "question": "Is it red?", "question_id": 9001},
        {"image_id": 25, "question": "How many squares are there?", "question_id": 25000},
    ]
    train_a = [
        {"question_id": 9000, "image_id": 9, "question_type": "what color is",
         "answer_type": "other", "multiple_choice_answer": "red",
         "answers": _answers(("red", 8), ("dark red", 2))},
        {"question_id": 9001, "image_id": 9, "question_type": "is it",
         "answer_type": "yes/no", "multiple_choice_answer": "yes",
         "answers": _answers(("yes", 10))},
        {"question_id": 25000, "image_id": 25, "question_type": "how many",
         "answer_type": "number", "multiple_choice_answer": "1",
         "answers": _answers(("1", 7), ("one", 2), ("2", 1))},
    ]
    val_q = [
        {"image_id": 42, "question": "What color is the square?", "question_id": 42000},
        {"image_id": 42, "question": "Is it blue?", "question_id": 42001},
    ]
    val_a = [
        {"question_id": 42000, "image_id": 42, "question_type": "what color is",
         "answer_type": "other", "multiple_choice_answer": "green",
         "answers": _answers(("green", 9), ("lime", 1))},
        {"question_id": 42001, "image_id": 42, "question_type": "is it",
         "answer_type": "yes/no", "multiple_choice_answer": "no",
         "answers": _answers(("no", 10))},
    ]
    for name, key, data in [
        ("v2_OpenEnded_mscoco_train2014_questions.json", "questions", train_q),
        ("v2_mscoco_train2014_annotations.json", "annotations", train_a),
        ("v2_OpenEnded_mscoco_val2014_questions.json", "questions", val_q),
        ("v2_mscoco_val2014_annotations.json", "annotations", val_a),
    ]:
        (root / name).write_text(json.dumps({key: data}))


def make_gqa(root):
    _save_image(root / "images" / "2354786.jpg", (0, 0, 250))
    _save_image(root / "images" / "n161313.jpg", (250, 250, 0), fmt="PNG")  # PNG named .jpg

    def q(image, question, answer, structural):
        return {"imageId": image, "question": question, "answer": answer,
                "fullAnswer": f"It is {answer}.",
                "types": {"structural": structural, "semantic": "attr",
                          "detailed": "colorQuery"}}

    files = {
        "train_balanced_questions.json": {
            "02930152": q("2354786", "Is the sky dark?", "yes", "verify"),
            "07333408": q("2354786", "What color is the square?", "blue", "query"),
            "1001": q("n161313", "Is it red or yellow?", "yellow", "choose")},
        "val_balanced_questions.json": {
            "201307251": q("n161313", "What color is it?", "yellow", "query")},
        "testdev_balanced_questions.json": {
            "20968379": q("2354786", "Is it blue?", "yes", "verify"),
            "20968380": q("n161313", "Is it blue?", "no", "verify")},
    }
    (root / "questions").mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / "questions" / name).write_text(json.dumps(data))
