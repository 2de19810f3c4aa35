"""metrics.py against values worked out by hand (the arithmetic is in the comments)."""
import math

import pytest

from metrics import (char_tokens, compute_metrics, corpus_bleu, corpus_rouge, exact_match, lcs_length,
                     parse_triples, rouge_l, rouge_n, triple_counts, triple_prf)

A = "发动机_部件故障_水温高"
B = "风扇_部件故障_低速转动"
C = "风扇_部件故障_不转"
D = "车辆_性能故障_加速无力"
E = "散热器_组成_水泵"
F = "喷油嘴_部件故障_堵塞"
G = "油箱_部件故障_漏油"


def test_exact_match_ignores_surrounding_whitespace_only():
    # "a" == "a"; " b \n" strips to "b"; "c" != "d"; "x y" != "xy" (inner spaces count) -> 2 of 4
    assert exact_match(["a", " b \n", "c", "x y"], ["a", "b", "d", "xy"]) == 0.5
    assert exact_match([], []) == 0.0
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        exact_match(["a", "b"], ["a"])


def test_parse_triples_is_a_set_of_stripped_lines():
    assert parse_triples(f"{A}\n{B}\n{B}\n\n  {A} \n") == {A, B}
    assert parse_triples("") == set()
    assert parse_triples(" \n\n") == set()


def test_triple_counts_count_duplicates_once():
    # prediction {A, B} (B written twice), reference {A, C}: one hit
    assert triple_counts(f"{A}\n{B}\n{B}", f"{A}\n{C}") == (1, 2, 2)
    assert triple_counts("", F) == (0, 0, 1)
    assert triple_counts("", "") == (0, 0, 0)


def test_triple_prf_is_micro_averaged():
    predictions = [f"{A}\n{B}\n{B}",  # {A, B} vs {A, C}: tp 1, pred 2, gold 2
                   "",  # {} vs {F, G}: tp 0, pred 0, gold 2 (an empty answer only costs recall)
                   "",  # {} vs {}: adds nothing
                   f"{D}\n\n  {E} "]  # {D, E} vs {D}: tp 1, pred 2, gold 1
    references = [f"{A}\n{C}", f"{F}\n{G}", "", D]
    result = triple_prf(predictions, references)
    # tp = 2, predicted = 4, reference = 5: P = 2/4 = 0.5, R = 2/5 = 0.4, F1 = 2*0.5*0.4/0.9 = 4/9
    assert (result["true_positives"], result["predicted"], result["reference"]) == (2, 4, 5)
    assert result["precision"] == pytest.approx(0.5)
    assert result["recall"] == pytest.approx(0.4)
    assert result["f1"] == pytest.approx(4 / 9)
    # micro, not macro: the per-sample F1s are 0.5, 0, (undefined), 2/3 -- their mean would differ
    assert result["f1"] != pytest.approx((0.5 + 0 + 2 / 3) / 3)


def test_triple_prf_empty_cases():
    # nothing to find and nothing predicted: perfect
    assert triple_prf([""], [""]) == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "true_positives": 0,
                                      "predicted": 0, "reference": 0}
    # nothing predicted, one to find: P has no predictions -> 0 (not perfect: there was something to find), R = 0/1
    assert triple_prf([""], [A])["precision"] == 0.0
    assert triple_prf([""], [A])["recall"] == 0.0
    assert triple_prf([""], [A])["f1"] == 0.0
    # one predicted, nothing to find: P = 0/1, R -> 0
    assert (triple_prf([A], [""])["precision"], triple_prf([A], [""])["recall"]) == (0.0, 0.0)
    # all right: 1.0
    assert triple_prf([f"{B}\n{A}"], [f"{A}\n{B}"])["f1"] == 1.0


def test_char_tokens_drop_whitespace():
    assert char_tokens("风扇 不转\n ok") == ["风", "扇", "不", "转", "o", "k"]


def test_bleu_one_sentence_by_hand():
    # prediction 发动机水温高 (c = 6), reference 发动机水温过高 (r = 7)
    # 1-grams: all 6 found                  -> p1 = 6/6
    # 2-grams: 发动 动机 机水 水温 | 温高 missing -> 4 of 5, smoothed (4+1)/(5+1) = 5/6
    # 3-grams: 发动机 动机水 机水温 | 水温高      -> 3 of 4, smoothed 4/5
    # 4-grams: 发动机水 动机水温 | 机水温高       -> 2 of 3, smoothed 3/4
    # BP = exp(1 - 7/6); BLEU = exp(-1/6) * (1 * 5/6 * 4/5 * 3/4) ** (1/4) = exp(-1/6) * (1/2) ** (1/4)
    expected = math.exp(-1 / 6) * 0.5 ** 0.25
    assert corpus_bleu(["发动机水温高"], ["发动机水温过高"]) == pytest.approx(expected)
    assert expected == pytest.approx(0.71180, abs=1e-5)  # 0.846482 * 0.840896


def test_bleu_is_corpus_level():
    # second pair: 风扇 不转 vs 风扇不转, the same 4 characters: 4/4, 3/3, 2/2, 1/1 n-gram matches
    # corpus sums: p1 = 10/10, p2 = (4+3+1)/(5+3+1) = 8/9, p3 = (3+2+1)/(4+2+1) = 6/7, p4 = (2+1+1)/(3+1+1) = 4/5
    # c = 10, r = 11: BP = exp(1 - 11/10) = exp(-0.1); 8/9 * 6/7 * 4/5 = 64/105
    expected = math.exp(-0.1) * (64 / 105) ** 0.25
    assert corpus_bleu(["发动机水温高", "风扇 不转"], ["发动机水温过高", "风扇不转"]) == pytest.approx(expected)
    # not the mean of the sentence scores (the second alone is 1.0)
    assert expected != pytest.approx((math.exp(-1 / 6) * 0.5 ** 0.25 + 1.0) / 2)


def test_bleu_edge_cases():
    assert corpus_bleu(["风扇不转"], ["风扇不转"]) == 1.0  # c == r: no penalty; smoothed (m+1)/(c+1) = 1
    assert corpus_bleu([""], ["风扇不转"]) == 0.0  # nothing predicted
    assert corpus_bleu(["喷油嘴"], ["风扇不转"]) == 0.0  # no character in common: p1 = 0
    # one right character: p1 = 1/1, no 2/3/4-grams to count: (0+1)/(0+1) = 1 each; BP = exp(1 - 4/1)
    assert corpus_bleu(["扇"], ["风扇不转"]) == pytest.approx(math.exp(-3))
    # a repeated character is clipped to its count in the reference: 1-grams 1 of 3 -> p1 = 1/3;
    # 2-grams 扇扇 x2, none in the reference -> 1/3; 3-gram 扇扇扇 -> 1/2; no 4-gram -> 1/1; c = 3 < r = 4
    expected = math.exp(1 - 4 / 3) * (1 / 3 * 1 / 3 * 1 / 2 * 1) ** 0.25
    assert corpus_bleu(["扇扇扇"], ["风扇不转"]) == pytest.approx(expected)


def test_rouge_by_hand():
    # 发动机水温高 vs 发动机水温过高
    # ROUGE-1: overlap 6, P = 6/6, R = 6/7, F = 2 * 6/7 / (13/7) = 12/13
    assert rouge_n("发动机水温高", "发动机水温过高", 1) == pytest.approx(12 / 13)
    # ROUGE-2: overlap 4 (温高 is not in the reference), P = 4/5, R = 4/6, F = (16/15) / (22/15) = 8/11
    assert rouge_n("发动机水温高", "发动机水温过高", 2) == pytest.approx(8 / 11)
    # ROUGE-L: the whole prediction is a subsequence: LCS 6, same as ROUGE-1 here: 12/13
    assert rouge_l("发动机水温高", "发动机水温过高") == pytest.approx(12 / 13)
    # 高温水 vs 水温高: same characters (ROUGE-1 = 1), no common bigram (ROUGE-2 = 0), LCS 1: F = 1/3
    assert rouge_n("高温水", "水温高", 1) == 1.0
    assert rouge_n("高温水", "水温高", 2) == 0.0
    assert rouge_l("高温水", "水温高") == pytest.approx(1 / 3)
    # repeated characters are clipped: 好好好 vs 好: overlap 1, P = 1/3, R = 1, F = (2/3) / (4/3) = 1/2
    assert rouge_n("好好好", "好", 1) == pytest.approx(0.5)


def test_rouge_empty_and_short_texts():
    assert rouge_n("", "高", 1) == 0.0 and rouge_l("", "高") == 0.0
    assert rouge_n("高", "", 1) == 0.0
    assert rouge_n("", "", 1) == 1.0 and rouge_n("", "", 2) == 1.0 and rouge_l("", "") == 1.0
    # no bigram on either side: equal texts score 1, different ones 0
    assert rouge_n("好", "好", 2) == 1.0
    assert rouge_n("好", "坏", 2) == 0.0
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # the textbook example (BCBA)


def test_corpus_rouge_averages_samples():
    result = corpus_rouge(["发动机水温高", "高温水"], ["发动机水温过高", "水温高"])
    assert result["rouge1"] == pytest.approx((12 / 13 + 1) / 2)
    assert result["rouge2"] == pytest.approx((8 / 11 + 0) / 2)
    assert result["rougeL"] == pytest.approx((12 / 13 + 1 / 3) / 2)


def test_compute_metrics_has_every_number():
    predictions = [f"{A}\n{B}", f"{D}"]
    references = [f"{A}\n{B}", f"{D}\n{E}"]
    result = compute_metrics(predictions, references)
    assert set(result) == {"samples", "exact_match", "triple_precision", "triple_recall", "triple_f1", "bleu4",
                           "rouge1", "rouge2", "rougeL"}
    assert result["samples"] == 2
    assert result["exact_match"] == 0.5
    # tp 3 of 3 predicted, 4 in the references: P = 1, R = 3/4, F1 = 1.5 / 1.75 = 6/7
    assert result["triple_precision"] == 1.0
    assert result["triple_recall"] == pytest.approx(0.75)
    assert result["triple_f1"] == pytest.approx(6 / 7)
    assert 0 < result["bleu4"] < 1 and 0 < result["rougeL"] < 1
    perfect = compute_metrics(references, references)
    assert all(perfect[k] == 1.0 for k in perfect if k != "samples")
