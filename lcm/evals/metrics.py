"""Scores of a continuation against references, by name (RULER, Giraffe, passkey).

Every metric is ``metric(output, references) -> float in [0, 1]`` where ``output`` is the generated continuation
only (never prompt + continuation; METHODS §11).

- ``string_match_all`` (RULER, all tasks but QA): the fraction of references contained in the output,
  case-insensitive. RULER's ``string_match_all`` in ``eval/synthetic/constants.py``.
- ``string_match_part`` (RULER QA): 1 if any reference is contained in the output, case-insensitive.
- ``presence`` (Giraffe FreeFormQA / AlteredNumericQA): 1 if any ``reference.strip()`` occurs in the output
  (Giraffe's presence accuracy, case-sensitive as in abacusai/Long-Context).
- ``word_recall`` (NIAH): the fraction of the answer's words found in the output.
- ``first_integer`` (LongChat-Lines, passkey): 1 if the first integer in the output equals the reference.
"""

from __future__ import annotations

import functools
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

Metric = Callable[[str, Sequence[str]], float]


def string_match_all(output: str, references: Sequence[str]) -> float:
    if not references:
        raise ValueError("string_match_all needs at least one reference")
    lowered = output.lower()
    return sum(ref.lower() in lowered for ref in references) / len(references)


def string_match_part(output: str, references: Sequence[str]) -> float:
    lowered = output.lower()
    return float(any(ref.lower() in lowered for ref in references))


def presence(output: str, references: Sequence[str]) -> float:
    return float(any(ref.strip() in output for ref in references))


def first_integer(output: str, references: Sequence[str]) -> float:
    match = re.search(r"-?\d+", output)
    return float(match is not None and any(int(match.group()) == int(ref) for ref in references))


def word_recall(output: str, references: Sequence[str]) -> float:
    """The needle test's score (:mod:`lcm.evals.niah`): the fraction of a reference's words in the output, best
    reference; case-insensitive word sets, so 1.0 means every word of the answer was produced."""
    found = set(re.findall(r"\w+", output.lower()))
    best = 0.0
    for ref in references:
        words = re.findall(r"\w+", ref.lower())
        best = max(best, sum(w in found for w in words) / max(len(words), 1))
    return best


METRICS: dict[str, Metric] = {
    "string_match_all": string_match_all,
    "word_recall": word_recall,
    "string_match_part": string_match_part,
    "presence": presence,
    "first_integer": first_integer,
}


def score(metric: str, output: str, references: Sequence[str]) -> float:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {sorted(METRICS)}")
    return METRICS[metric](output, references)


# ----------------------------------------------------------------------------------------------------
# LongBench (Bai et al. 2023, arXiv 2308.14508; THUDM/LongBench LongBench/metrics.py) and InfiniteBench
# (Zhang et al. 2024, arXiv 2402.13718; OpenBMB/InfiniteBench src/compute_scores.py). Each official metric scores one
# (prediction, ground truth) pair and eval.py takes the max over the references; here each metric takes the max
# itself. Tasks map to these names in lcm/evals/templates/longbench.json; the first-line rule of some LongBench tasks
# and the class list of the classification tasks are applied by lcm.evals.longbench.score_sample.


_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation, as LongBench's ``normalize_answer``: lower case, drop ASCII punctuation, drop the
    articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def _token_f1(prediction: Sequence[str], truth: Sequence[str]) -> float:
    num_same = sum((Counter(prediction) & Counter(truth)).values())
    if num_same == 0:
        return 0.0
    precision, recall = num_same / len(prediction), num_same / len(truth)
    return 2 * precision * recall / (precision + recall)


def qa_f1(output: str, references: Sequence[str]) -> float:
    """LongBench ``qa_f1_score``: F1 of the bags of normalised words (:func:`normalize_answer`)."""
    words = normalize_answer(output).split()
    return max((_token_f1(words, normalize_answer(ref).split()) for ref in references), default=0.0)


def exact_match(output: str, references: Sequence[str]) -> float:
    """SQuAD exact match: 1 if the normalised output equals a normalised reference (not a LongBench metric)."""
    normalized = normalize_answer(output)
    return float(any(normalized == normalize_answer(ref) for ref in references))


@functools.cache
def _rouge_scorer(kind: str) -> Any:
    from rouge_score import rouge_scorer  # imports nltk (~2 s): only when a ROUGE metric is used

    return rouge_scorer.RougeScorer([kind], use_stemmer=False)


def rouge_l(output: str, references: Sequence[str]) -> float:
    """ROUGE-L F1 (LongBench ``rouge_score``'s ``rouge-l`` ``f``), computed with Google's ``rouge-score``.

    Deviation: LongBench uses the ``rouge`` package (pltrdy), which splits the texts into sentences at ``.``, takes the
    summary-level union LCS over them, counts distinct whitespace-separated words and is case-sensitive; Google's
    ``rougeL`` lower-cases, keeps ``[a-z0-9]+`` tokens and takes one LCS over the whole text (Lin 2004's sentence-level
    ROUGE-L). Scores agree on single-sentence texts of plain words and differ slightly otherwise. An empty output
    scores 0, as LongBench's ``except: return 0.0`` does.
    """
    scorer = _rouge_scorer("rougeL")
    return max((scorer.score(ref, output)["rougeL"].fmeasure for ref in references), default=0.0)


def rouge_lsum(output: str, references: Sequence[str]) -> float:
    """ROUGE-Lsum F1 with sentences split at newlines: InfiniteBench's ``longbook_sum_eng`` metric (HF ``evaluate``'s
    ``rouge``, which is Google's ``rouge-score`` without stemming)."""
    scorer = _rouge_scorer("rougeLsum")
    return max((scorer.score(ref, output)["rougeLsum"].fmeasure for ref in references), default=0.0)


def classification(output: str, references: Sequence[str], *, all_classes: Sequence[str] | None = None) -> float:
    """LongBench ``classification_score`` (trec, lsht): ``1 / k`` when the true class is among the ``k`` class names
    found in the output (case-sensitive substrings), after dropping found names that are proper substrings of the
    true class; else 0.

    ``all_classes`` is the record's class list (LongBench's ``all_classes`` field), so this metric cannot be scored
    through :func:`score`; use ``lcm.evals.longbench.score_sample``, which passes it from ``sample.meta``.
    Deviation: LongBench removes the substrings from the list while iterating over it, which skips the name after each
    removed one; every such name is dropped here.
    """
    if all_classes is None:
        raise ValueError("classification needs all_classes; score with lcm.evals.longbench.score_sample")
    found = [name for name in all_classes if name in output]
    best = 0.0
    for truth in references:
        kept = [name for name in found if name == truth or name not in truth]
        if truth in kept:
            best = max(best, 1.0 / len(kept))
    return best


def _fraction_equal(output: str, number: str) -> float:
    """The fraction of the integers written in ``output`` that equal ``number`` (0 if there are none)."""
    numbers = re.findall(r"\d+", output)
    return sum(n == number for n in numbers) / len(numbers) if numbers else 0.0


def count(output: str, references: Sequence[str]) -> float:
    """LongBench ``count_score`` (passage_count): the fraction of the numbers in the output equal to the reference."""
    return max((_fraction_equal(output, ref.strip()) for ref in references), default=0.0)


def _paragraph_match(output: str, references: Sequence[str], pattern: str) -> float:
    best = 0.0
    for ref in references:
        match = re.search(pattern, ref)
        if match is None:
            raise ValueError(f"reference {ref!r} names no paragraph; expected the pattern {pattern!r}")
        best = max(best, _fraction_equal(output, match.group(1)))
    return best


def retrieval(output: str, references: Sequence[str]) -> float:
    """LongBench ``retrieval_score`` (passage_retrieval_en): the reference is ``Paragraph N``; the fraction of the
    numbers in the output equal to ``N``."""
    return _paragraph_match(output, references, r"Paragraph (\d+)")


def retrieval_zh(output: str, references: Sequence[str]) -> float:
    """LongBench ``retrieval_zh_score`` (passage_retrieval_zh): :func:`retrieval` with references ``段落N``."""
    return _paragraph_match(output, references, r"段落(\d+)")


def code_sim(output: str, references: Sequence[str]) -> float:
    """LongBench ``code_sim_score`` (lcc, repobench-p): fuzzywuzzy's ``fuzz.ratio`` / 100 between the first output
    line holding none of ```` ` ````, ``#``, ``//`` (after leading newlines are stripped; "" if there is none) and
    the reference.

    rapidfuzz's ``fuzz.ratio`` is the normalised InDel similarity that fuzzywuzzy computes with python-Levenshtein;
    it is rounded to a whole percent, equal strings score 1 and an empty one 0, as in fuzzywuzzy. Deviation:
    fuzzywuzzy without python-Levenshtein (LongBench's requirements.txt does not list it) falls back to difflib's
    SequenceMatcher, whose matching-block heuristic can give a lower ratio than the true LCS used here.
    """
    from rapidfuzz import fuzz

    line = next((ln for ln in output.lstrip("\n").split("\n") if not any(c in ln for c in ("`", "#", "//"))), "")

    def percent(ref: str) -> int:  # fuzzywuzzy's guards: equal strings 100, an empty one 0
        return 100 if line == ref else round(fuzz.ratio(line, ref)) if line and ref else 0

    return max(map(percent, references), default=0) / 100


def first_digits(output: str, references: Sequence[str]) -> float:
    """InfiniteBench passkey / number_string (``first_int_match``): 1 if the first run of digits in the output is
    exactly a reference (a string compare: leading zeros count)."""
    match = re.search(r"\d+", output)
    return float(match is not None and any(match.group() == ref.strip() for ref in references))


def _words(output: str) -> list[str]:
    """The output split at whitespace after InfiniteBench's punctuation is blanked out."""
    return re.sub(r"[\n:\"'.,?!{}]", " ", output).split()


def word_match(output: str, references: Sequence[str]) -> float:
    """InfiniteBench kv_retrieval: 1 if a reference is one of the output's words (:func:`_words`)."""
    words = set(_words(output))
    return float(any(ref in words for ref in references))


def name_match(output: str, references: Sequence[str]) -> float:
    """InfiniteBench longdialogue_qa_eng: 1 if a reference is one of the output's upper-cased words.

    Deviation: InfiniteBench checks the first reference only; any reference counts here.
    """
    words = {word.upper() for word in _words(output)}
    return float(any(ref in words for ref in references))


METRICS.update(
    {
        "qa_f1": qa_f1,
        "exact_match": exact_match,
        "rouge_l": rouge_l,
        "rouge_lsum": rouge_lsum,
        "classification": classification,
        "retrieval": retrieval,
        "retrieval_zh": retrieval_zh,
        "count": count,
        "code_sim": code_sim,
        "first_digits": first_digits,
        "word_match": word_match,
        "name_match": name_match,
    }
)
