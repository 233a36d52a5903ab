"""Text-similarity metrics of the ``text_similarity`` grader, each from a well-kept library and
each in [0, 1]. The libraries are imported on first use: ``import jobs.grading`` stays cheap.

Nothing here reads data from disk or the network: rouge-score tokenizes with a regular
expression (NLTK is used only for its Porter stemmer, which we leave off) and GLEU is NLTK's
``sentence_gleu``, which needs no corpus. OpenAI's ``cosine`` (an embedding model) and
``meteor`` (NLTK's WordNet corpus, a download) are not offered: :data:`UNSUPPORTED` says why.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from .errors import GraderError

ROUGE_METRICS = {f"rouge_{n}": f"rouge{n}" for n in range(1, 6)} | {"rouge_l": "rougeL"}
SUPPORTED = ("fuzzy_match", "bleu", "gleu", *ROUGE_METRICS)
UNSUPPORTED = {
    "cosine": "cosine needs an embedding model, and none is registered for graders",
    "meteor": "meteor needs NLTK's WordNet corpus, a download this platform does not make",
}
# ROUGE-L's longest common subsequence is quadratic in pure Python (about 1 s at 2,000 x 2,000
# tokens on these machines): a larger pair is an errored item, not a stalled worker.
MAX_ROUGE_L_CELLS = 4_000_000


def similarity(metric: str, hypothesis: str, reference: str) -> float:
    """The score in [0, 1] of ``hypothesis`` (the graded text) against ``reference``."""
    return _METRICS[metric](hypothesis, reference)


def fuzzy_match(hypothesis: str, reference: str) -> float:
    # OpenAI says "using rapidfuzz" without naming the scorer; fuzz.ratio is rapidfuzz's plain
    # normalized Indel similarity (python-Levenshtein's ratio), symmetric and case-sensitive.
    from rapidfuzz import fuzz

    return fuzz.ratio(hypothesis, reference) / 100.0


def bleu(hypothesis: str, reference: str) -> float:
    # sacrebleu's sentence BLEU: 13a tokenization, exponential smoothing, effective n-gram order.
    import sacrebleu

    return sacrebleu.sentence_bleu(hypothesis, [reference]).score / 100.0


def gleu(hypothesis: str, reference: str) -> float:
    # Google BLEU (Wu et al. 2016) as NLTK computes it, on sacrebleu's 13a tokens so that bleu
    # and gleu see the same words.
    from nltk.translate.gleu_score import sentence_gleu

    tokenize = _tokenizer_13a()
    return float(sentence_gleu([tokenize(reference).split()], tokenize(hypothesis).split()))


@functools.cache
def _tokenizer_13a() -> Callable[[str], str]:
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()


@functools.cache
def _rouge_scorer(rouge_type: str):
    """The scorer and its tokenizer (rouge-score's default: lowercase, ASCII letters and digits
    only, no stemming)."""
    from rouge_score import rouge_scorer, tokenizers

    tokenizer = tokenizers.DefaultTokenizer(use_stemmer=False)
    return rouge_scorer.RougeScorer([rouge_type], tokenizer=tokenizer), tokenizer


def _rouge(metric: str) -> Callable[[str, str], float]:
    rouge_type = ROUGE_METRICS[metric]

    def score(hypothesis: str, reference: str) -> float:
        scorer, tokenizer = _rouge_scorer(rouge_type)
        if rouge_type == "rougeL":
            cells = len(tokenizer.tokenize(hypothesis)) * len(tokenizer.tokenize(reference))
            if cells > MAX_ROUGE_L_CELLS:
                raise GraderError("input_too_large",
                                  f"rouge_l compares every token with every other: "
                                  f"{cells:,} token pairs is over the limit of "
                                  f"{MAX_ROUGE_L_CELLS:,}")
        # F-measure, as reported by rouge-score and by most papers; target first, then prediction.
        return float(scorer.score(reference, hypothesis)[rouge_type].fmeasure)

    return score


_METRICS: dict[str, Callable[[str, str], float]] = {
    "fuzzy_match": fuzzy_match, "bleu": bleu, "gleu": gleu,
    **{metric: _rouge(metric) for metric in ROUGE_METRICS},
}
