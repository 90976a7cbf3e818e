"""Hand-made cases for the VQA metrics; expected values worked out by hand."""

import pytest

from sab_jax.eval.metrics import (
    accuracy_table,
    exact_match,
    format_table,
    normalize_answer,
    vqav2_accuracy,
)


@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"),
    ("  YES. ", "yes"),
    ("yes!", "yes"),
    ("3.5", "3.5"),
    (".5", ".5"),
    ("u.s.", "us"),
    ("1,000", "1000"),
    ("red, white and blue", "red white and blue"),
    ("t-shirt", "t shirt"),
    ("(red)", "red"),
    ("black/white", "black white"),
    ("a dog", "dog"),
    ("The Cat", "cat"),
    ("an apple", "apple"),
    ("dont", "don't"),
    ("isnt", "isn't"),
    ("Whats that?", "what's that"),
    ("i dont know", "i don't know"),
    ("don't", "don't"),
    ("none", "0"),
    ("ten", "10"),
    ("10:30", "10:30"),
    ("ice\tcream\n", "ice cream"),
    (b"Three", "3"),
    ("", ""),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def _humans(match, k, other="3"):
    return [match] * k + [other] * (10 - k)


# k of 10 humans agree with the prediction. Leaving out each human in turn:
#   the k matching ones see k-1 matches among the other 9, the 10-k others see k;
#   acc = (k * min(1, (k-1)/3) + (10-k) * min(1, k/3)) / 10.
# k=1: (1*0 + 9*(1/3)) / 10 = 0.3;  k=2: (2*(1/3) + 8*(2/3)) / 10 = 0.6
# k=3: (3*(2/3) + 7*1) / 10 = 0.9;  k=4: (4*1 + 6*1) / 10 = 1.0
@pytest.mark.parametrize("k, expected", [
    (0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqav2_accuracy_leave_one_out(k, expected):
    assert vqav2_accuracy("two", _humans("2", k)) == pytest.approx(expected)
    # Matching is done after normalisation, on both sides.
    assert vqav2_accuracy("2", _humans("Two.", k)) == pytest.approx(expected)


def test_vqav2_accuracy_normalisation_cases():
    assert vqav2_accuracy("A dog.", ["dog"] * 4 + ["cat"] * 6) == 1.0
    assert vqav2_accuracy("dont know", ["don't know"] * 10) == 1.0
    assert vqav2_accuracy("1,000", ["1000"] * 2 + ["many"] * 8) == pytest.approx(0.6)
    assert vqav2_accuracy("red", ["red,"] + ["blue"] * 9) == pytest.approx(0.3)
    assert vqav2_accuracy("yes", ["no"] * 10) == 0.0
    # Mixed answers: 2 humans say "3", prediction matches them; the "three"
    # answers also normalise to "3", so k = 5 -> 1.0.
    assert vqav2_accuracy("3", ["3", "3", "three", "three", "Three", "4", "4", "4", "4", "4"]) == 1.0
    # Fewer than 10 answers (the formula is the same) and a single answer (exact).
    assert vqav2_accuracy("b", ["b", "b", "a"]) == pytest.approx((2 * (1 / 3) + 2 / 3) / 3)
    assert vqav2_accuracy("the Red", ["red"]) == 1.0
    assert vqav2_accuracy(b"two", [b"2"] * 3 + [b"x"] * 7) == pytest.approx(0.9)
    with pytest.raises(ValueError):
        vqav2_accuracy("x", [])


def test_exact_match():
    assert exact_match(" Yes. ", "yes") == 1.0
    assert exact_match("left  side", "Left side") == 1.0
    assert exact_match("blue!", "blue") == 1.0
    assert exact_match("two", "2") == 0.0  # no number-word mapping here
    assert exact_match("the table", "table") == 0.0  # nor article removal
    assert exact_match("red", ["blue", "red"]) == 1.0
    assert exact_match(b"no", [b"no"]) == 1.0


def test_accuracy_table_counts_and_means():
    records = [("yes/no", 1.0), ("yes/no", 0.0), ("yes/no", 1.0),
               ("number", 0.3), ("number", 0.9),
               {"question_type": b"other", "score": 0.6}]
    t = accuracy_table(records)
    assert t["count"] == 6
    assert t["accuracy"] == pytest.approx((1 + 0 + 1 + 0.3 + 0.9 + 0.6) / 6)  # per question
    assert list(t["per_type"]) == ["number", "other", "yes/no"]
    assert t["per_type"]["yes/no"] == {"accuracy": pytest.approx(2 / 3), "count": 3}
    assert t["per_type"]["number"] == {"accuracy": pytest.approx(0.6), "count": 2}
    assert t["per_type"]["other"] == {"accuracy": pytest.approx(0.6), "count": 1}
    assert accuracy_table([]) == {"accuracy": 0.0, "count": 0, "per_type": {}}


def test_format_table():
    t = accuracy_table([("number", 1.0), ("number", 0.5), ("yes/no", 0.0)])
    md = format_table(t)
    lines = md.strip().splitlines()
    assert lines[0] == "| question type | count | accuracy (%) |"
    assert lines[2] == "| number | 2 | 75.00 |"
    assert lines[3] == "| yes/no | 1 | 0.00 |"
    assert lines[4] == "| **overall** | 3 | 50.00 |"

    u = accuracy_table([("number", 0.0), ("number", 1.0), ("yes/no", 1.0)])
    md2 = format_table({"fp": t, "sab": u}, title="### VQAv2", percent=False, digits=3)
    lines = md2.strip().splitlines()
    assert lines[0] == "### VQAv2"
    assert lines[2] == "| question type | count | fp | sab |"
    assert "| number | 2 | 0.750 | 0.500 |" in lines
    assert "| **overall** | 3 | 0.500 | 0.667 |" in lines
    with pytest.raises(ValueError):
        format_table({"fp": {"not": "a table"}})
