"""VQA answer normalisation, accuracy metrics and per-question-type tables.

Pure Python (numpy-free even), so that evaluation code and reports can use it
anywhere. All functions accept ``str`` or ``bytes`` (TFDS data sources return text
fields as ``bytes``).

* :func:`normalize_answer` + :func:`vqav2_accuracy`: the VQAv2 evaluation rules
  (answer normalisation, then the leave-one-out "soft" accuracy against the 10
  human answers).
* :func:`exact_match`: light normalisation then equality (synthetic set, GQA).
* :func:`accuracy_table` / :func:`format_table`: overall and per-question-type
  accuracy, as a JSON-friendly dict and as a markdown table.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Union

__all__ = [
    "normalize_answer",
    "vqav2_accuracy",
    "exact_match",
    "accuracy_table",
    "format_table",
]

Text = Union[str, bytes]

# Punctuation the VQA evaluation treats as word separators (the apostrophe is not
# one of them: it belongs to contractions such as "don't"; commas and periods
# have their own rules below).
_SEPARATORS = frozenset(';/[]"{}()=+\\_-><@`,?!')

# Number words the VQA evaluation maps to digits. "none" -> "0" is part of the
# official rules (a "none" answer to "how many ..." is a count of zero).
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}

_ARTICLES = frozenset({"a", "an", "the"})

# Apostrophe-less spellings -> the contraction. A subset of the official table;
# spellings that are also common English words ("its", "id", "ill", "shed",
# "well", "were", "wed", "hell", "shell", "lets") are left alone, as the
# official table does for most of them.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldntve": "couldn't've", "couldnt've": "couldn't've",
    "couldn'tve": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadntve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hedve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "im": "i'm", "ive": "i've", "isnt": "isn't", "itd": "it'd",
    "itdve": "it'd've", "itll": "it'll", "maam": "ma'am", "mightnt": "mightn't",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't",
    "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't", "shant": "shan't",
    "shes": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldntve": "shouldn't've", "somebodys": "somebody's", "someones": "someone's",
    "somethings": "something's", "thats": "that's", "thered": "there'd",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldntve": "wouldn't've", "yall": "y'all", "youd": "you'd", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}

_COMMA_IN_NUMBER = re.compile(r"(?<=\d),(?=\d)")
_PERIOD = re.compile(r"\.")
_TRAILING_PUNCT = ".,!?;:"


def _to_str(s: Any) -> str:
    if isinstance(s, (bytes, bytearray)):
        return bytes(s).decode("utf-8")
    if hasattr(s, "item") and not isinstance(s, str):  # numpy scalar
        return _to_str(s.item())
    return str(s)


def _strip_period(m: re.Match) -> str:
    # A decimal point stays: followed by a digit and preceded by a digit ("3.5") or
    # by nothing/a space (".5"); every other period goes ("yes." -> "yes").
    s, i = m.string, m.start()
    decimal = (i + 1 < len(s) and s[i + 1].isdigit()
               and (i == 0 or s[i - 1].isdigit() or s[i - 1] == " "))
    return "." if decimal else ""


def normalize_answer(s: Text) -> str:
    """Normalises an answer the way the VQAv2 evaluation does.

    In order: lower-case, whitespace collapsed; commas inside numbers dropped
    ("1,000" -> "1000"); periods dropped unless they are a decimal point ("yes." ->
    "yes", "u.s." -> "us", "3.5" and ".5" stay); the other punctuation marks separate words ("t-shirt" ->
    "t shirt", "(red)" -> "red"); then word by word: number words become digits
    ("two" -> "2"), the articles a/an/the are removed, apostrophe-less
    contractions get their apostrophe ("dont" -> "don't").

    One deliberate simplification of the official script: there a punctuation mark
    is either deleted or replaced by a space depending on whether *some*
    occurrence in the answer touches a space; here every mark separates words,
    which gives the same result except on answers mixing both forms.
    """
    s = _to_str(s).replace("\n", " ").replace("\t", " ").strip().lower()
    s = _COMMA_IN_NUMBER.sub("", s)
    s = _PERIOD.sub(_strip_period, s)
    s = "".join(" " if c in _SEPARATORS else c for c in s)
    words = []
    for w in s.split():
        w = _NUMBER_WORDS.get(w, w)
        if w in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def vqav2_accuracy(prediction: Text, answers: Sequence[Text]) -> float:
    """VQAv2 soft accuracy of ``prediction`` against the human ``answers`` (10 in VQAv2).

    After :func:`normalize_answer`, each human answer i in turn is left out and the
    prediction scores ``min(1, #matches among the other answers / 3)``; the score
    is the mean over i. With 10 answers of which k match the prediction this is
    0, 0.3, 0.6, 0.9, 1.0 for k = 0, 1, 2, 3, >= 4 (not exactly
    ``min(k/3, 1)``). With a single reference answer it is exact match.
    """
    if isinstance(answers, (str, bytes)):
        answers = [answers]
    gts = [normalize_answer(a) for a in answers]
    if not gts:
        raise ValueError("vqav2_accuracy needs at least one reference answer")
    pred = normalize_answer(prediction)
    if len(gts) == 1:
        return float(pred == gts[0])
    matches = sum(g == pred for g in gts)
    total = 0.0
    for g in gts:
        others = matches - (g == pred)
        total += min(1.0, others / 3.0)
    return total / len(gts)


def _light_normalize(s: Text) -> str:
    s = " ".join(_to_str(s).lower().split())
    return s.rstrip(_TRAILING_PUNCT).rstrip()


def exact_match(prediction: Text, answer: Union[Text, Sequence[Text]]) -> float:
    """1.0 if ``prediction`` equals ``answer`` after light normalisation, else 0.0.

    Light normalisation: lower-case, whitespace stripped and collapsed, trailing
    ``.,!?;:`` dropped (no number/article/contraction rules). ``answer`` may be a
    list of acceptable answers (GQA's ``answers`` field): any of them counts.
    """
    refs = [answer] if isinstance(answer, (str, bytes)) else list(answer)
    pred = _light_normalize(prediction)
    return float(any(pred == _light_normalize(a) for a in refs))


def _records(records: Iterable[Any]) -> Iterable[tuple[str, float]]:
    for r in records:
        if isinstance(r, Mapping):
            qtype, score = r["question_type"], r["score"]
        else:
            qtype, score = r
        yield _to_str(qtype), float(score)


def accuracy_table(records: Iterable[Any]) -> dict[str, Any]:
    """Overall and per-question-type accuracy of scored questions.

    Args:
      records: ``(question_type, score)`` pairs, or mappings with keys
        ``"question_type"`` and ``"score"``; a score is a per-question accuracy in
        [0, 1] (e.g. from :func:`vqav2_accuracy` or :func:`exact_match`).

    Returns:
      ``{"accuracy": float, "count": int, "per_type": {type: {"accuracy": float,
      "count": int}}}``, types sorted by name; the overall accuracy is the mean
      over questions (not over types). Accuracies of empty sets are 0.0.
    """
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for qtype, score in _records(records):
        sums[qtype] = sums.get(qtype, 0.0) + score
        counts[qtype] = counts.get(qtype, 0) + 1
    n = sum(counts.values())
    return {
        "accuracy": sum(sums.values()) / n if n else 0.0,
        "count": n,
        "per_type": {t: {"accuracy": sums[t] / counts[t], "count": counts[t]}
                     for t in sorted(counts)},
    }


def _is_table(x: Any) -> bool:
    return isinstance(x, Mapping) and "per_type" in x and "accuracy" in x


def format_table(tables: Mapping[str, Any], *, title: str | None = None,
                 percent: bool = True, digits: int = 2) -> str:
    """A markdown table of one :func:`accuracy_table` result, or of several side by side.

    Args:
      tables: one ``accuracy_table`` result (columns: type, count, accuracy) or a
        mapping ``name -> accuracy_table result`` (one accuracy column per name,
        e.g. per quantisation method).
      title: optional line printed above the table.
      percent: show accuracies as percentages (else fractions).
      digits: decimals shown.
    """
    named = {"accuracy": tables} if _is_table(tables) else dict(tables)
    if not named or not all(_is_table(t) for t in named.values()):
        raise ValueError("format_table expects an accuracy_table() result or a mapping of them")
    names = list(named)
    types: list[str] = sorted({t for tab in named.values() for t in tab["per_type"]})

    def cell(entry: Mapping[str, Any] | None, ref_count: int | None) -> str:
        if entry is None:
            return "–"
        value = entry["accuracy"] * (100.0 if percent else 1.0)
        text = f"{value:.{digits}f}"
        if ref_count is not None and entry["count"] != ref_count:
            text += f" (n={entry['count']})"
        return text

    def row(label: str, entries: list[Mapping[str, Any] | None]) -> str:
        present = [e for e in entries if e is not None]
        ref = present[0]["count"] if present else 0
        cells = [cell(e, ref) for e in entries]
        return "| " + " | ".join([label, str(ref)] + cells) + " |"

    unit = " (%)" if percent else ""
    header = ["question type", "count"] + [f"{n}{unit}" for n in names]
    lines = [] if title is None else [title, ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---", "---:"] + ["---:"] * len(names)) + "|")
    for t in types:
        lines.append(row(t, [named[n]["per_type"].get(t) for n in names]))
    lines.append(row("**overall**", [named[n] for n in names]))
    return "\n".join(lines) + "\n"
