"""Evaluation metrics for generated answers, in pure Python.

    from metrics import compute_metrics
    compute_metrics(predictions, references)
    # {"samples": 2, "exact_match": 0.5, "triple_precision": ..., "triple_recall": ..., "triple_f1": ...,
    #  "bleu4": ..., "rouge1": ..., "rouge2": ..., "rougeL": ...}

All scores are fractions in [0, 1]. The functions compare the strings they are given: normalise predictions and
references alike first (predict.py passes both through the official post-processing of the mode, see
predict.reference_answer), or a prediction identical to its reference can score 0.

- exact match: prediction and reference equal once surrounding whitespace is stripped.
- triples (information extraction answers such as "发动机_部件故障_水温高\\n风扇_部件故障_低速转动"): one triple a
  line, surrounding whitespace stripped, blank lines ignored, set semantics (a triple written twice counts once).
  Precision, recall and F1 are micro-averaged: true positives, predicted and reference triples are summed over the
  corpus first. A sample whose prediction and reference are both empty adds nothing; over a corpus with no predicted
  triple precision is 1.0 when there is no reference triple either, else 0.0 (recall likewise); F1 is 0.0 when
  precision + recall is 0.
- BLEU-4: corpus level (n-gram matches and counts summed over the corpus, one brevity penalty for the corpus), on
  character tokens, with add-one smoothing of the 2-, 3- and 4-gram precisions (BLEU+1 of Lin and Och, 2004):
  p_1 = m_1 / c_1, p_n = (m_n + 1) / (c_n + 1) for n > 1, BLEU = BP * exp(mean(log p_n)),
  BP = 1 if c > r else exp(1 - r / c); 0.0 when no character was predicted or p_1 is 0.
- ROUGE-1, ROUGE-2 (n-gram overlap) and ROUGE-L (longest common subsequence): the F1 of each sample on character
  tokens, averaged over the samples. A sample with no n-gram on either side scores 1.0 when the two texts are
  equal character for character, else 0.0; with n-grams on one side only it scores 0.0.

Tool calls (`tool_call_metrics`, for glm3/glm4 conversations with tools): a turn's prediction and reference are each
what `chat()` returns: a text answer (str), one call {"name", "content"} (content: the argument text as generated;
chat() may add "parameters", which is not read here) or a list of such calls (several calls in one turn). A call's
arguments are VALID when its content reads as the mode writes arguments (model.template.call_arguments, the same
reading chat() uses: glm4 a JSON object; glm3 ChatGLM3's "```python\ntool_call(key=value, ...)\n```", read without
running it; blank arguments count as {}: a call without arguments; glm3 code-interpreter calls are code, not
arguments, and count as invalid); two arguments are EQUAL when they are the same value, key order and whitespace
aside (compared as canonical JSON: keys sorted, so 1 and 1.0, or true and 1, differ); invalid ones are
equal only as identical stripped text. A call marked incomplete ("incomplete": True, cut by --max_new_tokens, see
model.template.process_response) counts as a call that is wrong in every respect: invalid, of no name. Within a
turn each reference call is paired with at most one predicted call: the pairing with the most same-name pairs, then
the most equal arguments, then the most shared key/value pairs (the order of parallel calls does not count). Then:
- call_decision_accuracy: share of all turns where the prediction calls a tool exactly when the reference does.
- call_name_accuracy: share of the reference calls paired with a predicted call of the same name (a turn answered
  with text where a call was due scores 0 for each of its calls).
- call_argument_validity: share of all predicted calls (in any turn) whose arguments are valid.
- call_argument_exact_match: share of the reference calls paired with a call of the same name and equal arguments.
- call_argument_f1: micro F1 = 2 TP / (predicted + reference) of the top-level (key, value) pairs of the arguments,
  over the turns whose reference calls: TP are the pairs shared by paired calls of the same name; predicted pairs
  are those of every predicted call of those turns (none for invalid arguments), reference pairs those of every
  reference call (values compared as canonical JSON).
- call_set_precision / call_set_recall / call_set_f1: every turn's calls as a multiset of (name, arguments), summed
  over all turns: true positives = the multiset intersection, precision = TP / predicted calls, recall = TP /
  reference calls, F1 = 2 TP / (predicted + reference) (a single call is a set of one; a call predicted where text
  was due is a false positive).
- parallel_call_precision / parallel_call_recall: the same, over the turns whose reference makes two or more calls.
A score whose denominator is 0 (no predicted call, no reference call, no parallel turn) is None (null in JSON).

Character tokens: every non-whitespace character is a token, which is how Chinese text is usually scored without a
word segmenter (Latin letters count one by one too).
"""
from __future__ import annotations

import itertools
import json
import math
from collections import Counter

from model.template import call_arguments, is_incomplete


def char_tokens(text: str) -> list[str]:
    """Every non-whitespace character of `text`, in order."""
    return [c for c in text if not c.isspace()]


def ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _check_pairs(predictions, references) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")


# ---------------------------------------------------------------------------------------------------------------
# exact match
# ---------------------------------------------------------------------------------------------------------------
def exact_match(predictions: list[str], references: list[str]) -> float:
    """Share of samples whose prediction equals the reference (surrounding whitespace ignored); 0.0 for none."""
    _check_pairs(predictions, references)
    if not predictions:
        return 0.0
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(predictions)


# ---------------------------------------------------------------------------------------------------------------
# triples
# ---------------------------------------------------------------------------------------------------------------
def parse_triples(text: str) -> set[str]:
    """The set of triples in an extraction answer: one a line, stripped, blank lines dropped."""
    return {line.strip() for line in text.split("\n") if line.strip()}


def triple_counts(prediction: str, reference: str) -> tuple[int, int, int]:
    """(true positives, predicted triples, reference triples) of one sample, each triple counted once."""
    predicted, gold = parse_triples(prediction), parse_triples(reference)
    return len(predicted & gold), len(predicted), len(gold)


def _ratio(hits: int, total: int, other_total: int) -> float:
    """hits / total; with total 0 the score is perfect only when the other side is empty too."""
    if total == 0:
        return 1.0 if other_total == 0 else 0.0
    return hits / total


def triple_prf(predictions: list[str], references: list[str]) -> dict:
    """Micro-averaged triple precision, recall and F1 over a corpus, with the summed counts."""
    _check_pairs(predictions, references)
    tp = n_pred = n_gold = 0
    for prediction, reference in zip(predictions, references):
        hits, predicted, gold = triple_counts(prediction, reference)
        tp, n_pred, n_gold = tp + hits, n_pred + predicted, n_gold + gold
    precision = _ratio(tp, n_pred, n_gold)
    recall = _ratio(tp, n_gold, n_pred)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "true_positives": tp, "predicted": n_pred,
            "reference": n_gold}


# ---------------------------------------------------------------------------------------------------------------
# BLEU-4
# ---------------------------------------------------------------------------------------------------------------
def corpus_bleu(predictions: list[str], references: list[str], max_n: int = 4) -> float:
    """Corpus BLEU on character tokens with add-one smoothing of the n > 1 precisions (see the module doc)."""
    _check_pairs(predictions, references)
    matches, counts = [0] * max_n, [0] * max_n
    pred_len = ref_len = 0
    for prediction, reference in zip(predictions, references):
        pred_tokens, ref_tokens = char_tokens(prediction), char_tokens(reference)
        pred_len, ref_len = pred_len + len(pred_tokens), ref_len + len(ref_tokens)
        for n in range(1, max_n + 1):
            pred_grams, ref_grams = ngrams(pred_tokens, n), ngrams(ref_tokens, n)
            matches[n - 1] += sum(min(count, ref_grams[gram]) for gram, count in pred_grams.items())
            counts[n - 1] += sum(pred_grams.values())
    if pred_len == 0 or matches[0] == 0:
        return 0.0
    log_precision = math.log(matches[0] / counts[0])
    for n in range(1, max_n):
        log_precision += math.log((matches[n] + 1) / (counts[n] + 1))
    brevity = 1.0 if pred_len > ref_len else math.exp(1 - ref_len / pred_len)
    return brevity * math.exp(log_precision / max_n)


# ---------------------------------------------------------------------------------------------------------------
# ROUGE
# ---------------------------------------------------------------------------------------------------------------
def _f1(overlap: int, predicted: int, reference: int, same_text: bool) -> float:
    if predicted == 0 and reference == 0:
        return 1.0 if same_text else 0.0
    if predicted == 0 or reference == 0 or overlap == 0:
        return 0.0
    precision, recall = overlap / predicted, overlap / reference
    return 2 * precision * recall / (precision + recall)


def rouge_n(prediction: str, reference: str, n: int) -> float:
    """ROUGE-N F1 of one sample on character tokens (clipped n-gram overlap)."""
    pred_tokens, ref_tokens = char_tokens(prediction), char_tokens(reference)
    pred_grams, ref_grams = ngrams(pred_tokens, n), ngrams(ref_tokens, n)
    overlap = sum(min(count, ref_grams[gram]) for gram, count in pred_grams.items())
    return _f1(overlap, sum(pred_grams.values()), sum(ref_grams.values()), pred_tokens == ref_tokens)


def lcs_length(a: list, b: list) -> int:
    """Length of the longest common subsequence (O(len(a) * len(b)) time, O(len(b)) memory)."""
    if not a or not b:
        return 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of one sample on character tokens."""
    pred_tokens, ref_tokens = char_tokens(prediction), char_tokens(reference)
    return _f1(lcs_length(pred_tokens, ref_tokens), len(pred_tokens), len(ref_tokens), pred_tokens == ref_tokens)


def corpus_rouge(predictions: list[str], references: list[str]) -> dict:
    """ROUGE-1/2/L F1 averaged over the samples (0.0 for an empty corpus)."""
    _check_pairs(predictions, references)
    if not predictions:
        return {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    pairs = list(zip(predictions, references))
    return {"rouge1": sum(rouge_n(p, r, 1) for p, r in pairs) / len(pairs),
            "rouge2": sum(rouge_n(p, r, 2) for p, r in pairs) / len(pairs),
            "rougeL": sum(rouge_l(p, r) for p, r in pairs) / len(pairs)}


# ---------------------------------------------------------------------------------------------------------------
# everything at once
# ---------------------------------------------------------------------------------------------------------------
def compute_metrics(predictions: list[str], references: list[str]) -> dict:
    """All metrics of predict.py as one flat dict of numbers."""
    triples = triple_prf(predictions, references)
    return {"samples": len(predictions), "exact_match": exact_match(predictions, references),
            "triple_precision": triples["precision"], "triple_recall": triples["recall"],
            "triple_f1": triples["f1"], "bleu4": corpus_bleu(predictions, references),
            **corpus_rouge(predictions, references)}


# ---------------------------------------------------------------------------------------------------------------
# tool calls
# ---------------------------------------------------------------------------------------------------------------
MAX_CALLS_TO_PERMUTE = 7  # beyond this many calls in one turn, pairs are formed in order (7! pairings at most)


def as_calls(response) -> list[dict] | None:
    """The calls of a chat() response ({"name", "content"} or a list of them), or None for a text answer."""
    if isinstance(response, dict):
        return [response]
    if isinstance(response, list):
        return list(response)
    return None


def canonical_json(value) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _call_key(call: dict, mode: str) -> tuple[str, str]:
    """(name, arguments) as compared for equality: canonical JSON of the arguments as `call_arguments` reads them,
    or the stripped text when they do not read."""
    arguments = call_arguments(mode, call.get("content"))
    text = canonical_json(arguments) if arguments is not None else "\0" + str(call.get("content")).strip()
    if is_incomplete(call):  # cut by the token limit: wrong, even where what was written so far matches
        return "\0incomplete " + str(call.get("name")).strip(), text
    return str(call.get("name")).strip(), text


def _call_multiset(calls: list[dict], mode: str) -> Counter:
    return Counter(_call_key(call, mode) for call in calls)


def _key_values(call: dict, mode: str) -> set[tuple[str, str]]:
    arguments = (None if is_incomplete(call) else call_arguments(mode, call.get("content"))) or {}
    return {(key, canonical_json(value)) for key, value in arguments.items()}


def _pair_score(reference: dict, predicted: dict | None, mode: str) -> tuple[int, int, int]:
    """(same name, equal arguments, shared key/value pairs) of one pairing."""
    if predicted is None or _call_key(reference, mode)[0] != _call_key(predicted, mode)[0]:
        return 0, 0, 0
    return (1, int(_call_key(reference, mode) == _call_key(predicted, mode)),
            len(_key_values(reference, mode) & _key_values(predicted, mode)))


def pair_calls(references: list[dict], predictions: list[dict], mode: str = "glm4") -> list[tuple[dict, dict | None]]:
    """Each reference call with its predicted call (or None), by the pairing the module doc describes."""
    slots = list(predictions) + [None] * max(0, len(references) - len(predictions))
    if max(len(references), len(predictions)) > MAX_CALLS_TO_PERMUTE:
        return list(zip(references, slots))
    best, best_score = None, None
    for order in itertools.permutations(range(len(slots)), len(references)):
        pairs = [(ref, slots[i]) for ref, i in zip(references, order)]
        score = tuple(map(sum, zip((0, 0, 0), *(_pair_score(r, p, mode) for r, p in pairs))))
        if best_score is None or score > best_score:
            best, best_score = pairs, score
    return best


def _share(hits: int, total: int):
    return hits / total if total else None


def _count_f1(true_positives: int, predicted: int, reference: int):
    """F1 from counts (2 TP / (predicted + reference), the harmonic mean of precision and recall)."""
    return 2 * true_positives / (predicted + reference) if predicted + reference else None


def tool_call_metrics(predictions: list, references: list, mode: str = "glm4") -> dict:
    """Tool-call scores of chat() responses against the references, turn by turn (see the module doc). A call's
    arguments are its "content" read as `mode` writes them (model.template.call_arguments: glm3 ChatGLM3's
    tool_call(...), glm4 a JSON object), so a glm3 prediction identical to its reference scores 1."""
    _check_pairs(predictions, references)
    decisions = n_ref = n_pred = names = exact = valid = 0
    kv_tp = kv_pred = kv_ref = 0
    set_tp = set_pred = set_ref = 0
    parallel_turns = par_tp = par_pred = par_ref = 0
    call_turns = 0
    for prediction, reference in zip(predictions, references):
        predicted, gold = as_calls(prediction), as_calls(reference)
        decisions += (predicted is not None) == (gold is not None)
        predicted, gold = predicted or [], gold or []
        n_pred += len(predicted)
        valid += sum(call_arguments(mode, call.get("content")) is not None and not is_incomplete(call)
                     for call in predicted)
        shared = sum((_call_multiset(predicted, mode) & _call_multiset(gold, mode)).values())
        set_tp, set_pred, set_ref = set_tp + shared, set_pred + len(predicted), set_ref + len(gold)
        if len(gold) > 1:
            parallel_turns += 1
            par_tp, par_pred, par_ref = par_tp + shared, par_pred + len(predicted), par_ref + len(gold)
        if not gold:
            continue
        call_turns += 1
        n_ref += len(gold)
        for ref_call, pred_call in pair_calls(gold, predicted, mode):
            same_name, equal, shared_kv = _pair_score(ref_call, pred_call, mode)
            names, exact, kv_tp = names + same_name, exact + equal, kv_tp + shared_kv
        kv_pred += sum(len(_key_values(call, mode)) for call in predicted)
        kv_ref += sum(len(_key_values(call, mode)) for call in gold)
    return {"turns": len(predictions), "call_turns": call_turns, "reference_calls": n_ref, "predicted_calls": n_pred,
            "call_decision_accuracy": _share(decisions, len(predictions)),
            "call_name_accuracy": _share(names, n_ref),
            "call_argument_validity": _share(valid, n_pred),
            "call_argument_exact_match": _share(exact, n_ref),
            "call_argument_f1": _count_f1(kv_tp, kv_pred, kv_ref),
            "call_set_precision": _share(set_tp, set_pred), "call_set_recall": _share(set_tp, set_ref),
            "call_set_f1": _count_f1(set_tp, set_pred, set_ref),
            "parallel_turns": parallel_turns,
            "parallel_call_precision": _share(par_tp, par_pred), "parallel_call_recall": _share(par_tp, par_ref)}
