"""DROP's official EM and F1 (Dua et al. 2019): answer normalisation with number canonicalisation,
bag-of-tokens F1 per span, spans aligned one-to-one to maximise F1, numbers required to match, and the
maximum over all gold annotations.
"""

from __future__ import annotations

import itertools
import re
import string

_PUNCTUATION = set(string.punctuation)


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _normalize_token(token: str) -> str:
    token = token.lower()
    if not is_number(token):
        token = "".join(ch for ch in token if ch not in _PUNCTUATION)
    if is_number(token):
        token = str(float(token))
    token = re.sub(r"\b(a|an|the)\b", " ", token)
    return " ".join(token.split())


def normalize_answer(text: str) -> str:
    parts = [_normalize_token(t) for t in re.split(r" |-", text)]
    return " ".join(p for p in parts if p.strip()).strip()


def _bags(answer: list[str]) -> tuple[list[str], list[set[str]]]:
    spans = [normalize_answer(s) for s in answer]
    return spans, [set(s.split()) for s in spans]


def _f1(predicted: set[str], gold: set[str]) -> float:
    common = len(predicted & gold)
    precision = common / len(predicted) if predicted else 1.0
    recall = common / len(gold) if gold else 1.0
    return 0.0 if precision == 0 and recall == 0 else 2 * precision * recall / (precision + recall)


def _numbers_agree(gold: set[str], predicted: set[str]) -> bool:
    gold_numbers = {w for w in gold if is_number(w)}
    return not gold_numbers or bool(gold_numbers & {w for w in predicted if is_number(w)})


def _aligned_f1(predicted: list[set[str]], gold: list[set[str]]) -> float:
    """Mean over max(#gold, #predicted) of the F1 of a one-to-one span assignment maximising the total."""
    scores = [[_f1(p, g) if _numbers_agree(g, p) else 0.0 for p in predicted] for g in gold]
    # Spans are few (DROP answers have at most a handful), so the exact assignment by enumeration is cheap.
    if len(gold) <= len(predicted):
        best = max(sum(scores[g][p] for g, p in enumerate(perm))
                   for perm in itertools.permutations(range(len(predicted)), len(gold)))
    else:
        best = max(sum(scores[g][p] for p, g in enumerate(perm))
                   for perm in itertools.permutations(range(len(gold)), len(predicted)))
    return best / max(len(gold), len(predicted))


def em_f1(predicted: list[str], gold: list[str]) -> tuple[float, float]:
    """EM and F1 of one predicted answer (a list of spans) against one gold answer (a list of spans)."""
    pred_spans, pred_bags = _bags(predicted)
    gold_spans, gold_bags = _bags(gold)
    exact = float(set(pred_spans) == set(gold_spans) and len(pred_spans) == len(gold_spans))
    return exact, round(_aligned_f1(pred_bags, gold_bags), 2)


def drop_metrics(predicted: str | list[str], golds: list[list[str]]) -> tuple[float, float]:
    """Maximum EM and maximum F1 over the gold annotations."""
    spans = [predicted] if isinstance(predicted, str) else list(predicted)
    results = [em_f1(spans, gold) for gold in golds]
    return max(r[0] for r in results), max(r[1] for r in results)
