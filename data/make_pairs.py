"""Writes the preference example set (DPO / ORPO): data/pairs_train.jsonl from data/train.jsonl and
data/pairs_dev.jsonl from data/dev.jsonl.

    python data/make_pairs.py        # deterministic: the same files every time

Each pair keeps the sample's instruction and input; "chosen" is its reference extraction, "rejected" a typical
mistake of an extraction model on the same text, one per pair in turn: a triple's relation swapped for another of the
four, a triple left out (or, for one triple, the answer of another sample), or the triples joined with "；" instead
of the newline the instruction asks for.
"""
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
RELATIONS = ("性能故障", "部件故障", "组成", "检测工具")


def swapped_relation(triples: list[str]) -> list[str]:
    head, relation, tail = triples[0].split("_", 2)
    other = RELATIONS[(RELATIONS.index(relation) + 1) % len(RELATIONS)] if relation in RELATIONS else RELATIONS[0]
    return [f"{head}_{other}_{tail}"] + triples[1:]


def rejected_answer(index: int, output: str, other_output: str) -> str:
    triples = output.split("\n")
    kind = index % 3
    if kind == 0:
        return "\n".join(swapped_relation(triples))
    if kind == 1:
        return "\n".join(triples[:-1]) if len(triples) > 1 else other_output
    return "；".join(triples) if len(triples) > 1 else "\n".join(swapped_relation(triples))


def write_pairs(source: str, target: str) -> None:
    samples = [json.loads(line) for line in (HERE / source).read_text(encoding="utf-8").splitlines() if line]
    with open(HERE / target, "w", encoding="utf-8") as f:
        for index, sample in enumerate(samples):
            other = samples[(index + 1) % len(samples)]["output"]
            rejected = rejected_answer(index, sample["output"], other)
            assert rejected != sample["output"], sample
            pair = {"instruction": sample["instruction"], "input": sample["input"], "chosen": sample["output"],
                    "rejected": rejected}
            f.write(json.dumps(pair, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    write_pairs("train.jsonl", "pairs_train.jsonl")
    write_pairs("dev.jsonl", "pairs_dev.jsonl")
