"""Build a small real tiktoken ranks file with the layout of GLM-4's `tokenizer.model`.

`python -m model.tiny --mode glm4` and the tests need a GLM-4 tokenizer without the 2.6 MB official file. The official
file is a byte-level BPE: one `base64(token bytes) rank` line per token, ranks 0..n-1, no special tokens (the
tokenizer appends them from n). This module trains such a BPE on the bundled `model/tiny_corpus.txt`:

- ranks 0..255 are the 256 single bytes (rank = byte value), so every UTF-8 text (any byte string, in fact)
  encodes and decodes back exactly;
- ranks 256.. are merges learned on the corpus after GLM-4's pre-tokenisation (`GLM4_PATTERN`), most frequent
  pair first, ties broken by the pair's ranks, so the file is the same on every run.

With the default 1024 ranks the tiny GLM-4 tokenizer has <|endoftext|> 1024, [gMASK] 1026, <sop> 1028, <|user|> 1031,
<|assistant|> 1032, <|observation|> 1033 (official 151329, 151331, 151333, 151336, 151337, 151338).
"""
from __future__ import annotations

import base64
import heapq
import os
from collections import Counter, defaultdict

import regex

from .sp_build import CORPUS_FILE
from .tokenization_glm4 import GLM4_PATTERN, GLM4_TOKENIZER_FILE

DEFAULT_RANKS = 1024


def _words(text: str) -> Counter:
    """Pre-tokens of the corpus (GLM-4's regex), as byte strings with their counts."""
    return Counter(piece.encode("utf-8") for piece in regex.findall(GLM4_PATTERN, text))


def train_ranks(text: str, n_ranks: int = DEFAULT_RANKS) -> list[bytes]:
    """Token bytes in rank order: the 256 single bytes, then `n_ranks - 256` merges learned on `text`.

    Pair counts are kept up to date incrementally (only the words holding the merged pair are recounted), which
    keeps the build around a second for the bundled corpus.
    """
    if n_ranks < 256:
        raise ValueError(f"n_ranks={n_ranks}: a byte-level BPE needs at least the 256 single bytes")
    tokens = [bytes([b]) for b in range(256)]
    counts = _words(text)
    words = [list(word) for word in counts]  # each word as a list of ranks (single bytes to start)
    freqs = list(counts.values())
    pair_counts: Counter = Counter()
    where: dict[tuple[int, int], set[int]] = defaultdict(set)
    for index, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freqs[index]
            where[pair].add(index)
    # A heap of (-count, pair) entries; an entry whose count is out of date is skipped when it comes up. The order
    # (most frequent first, then smallest ranks) never depends on dict order, so the file is the same on every run.
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    while len(tokens) < n_ranks:
        while heap and -heap[0][0] != pair_counts.get(heap[0][1], 0):
            heapq.heappop(heap)
        if not heap or -heap[0][0] <= 0:
            raise ValueError(f"the corpus only supports {len(tokens)} ranks, not {n_ranks}")
        _, best = heapq.heappop(heap)
        new = len(tokens)
        tokens.append(tokens[best[0]] + tokens[best[1]])
        changed = set()
        for index in sorted(where.pop(best, ())):
            word, freq = words[index], freqs[index]
            for pair in zip(word, word[1:]):
                pair_counts[pair] -= freq
                changed.add(pair)
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(new)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            words[index] = merged
            for pair in zip(merged, merged[1:]):
                pair_counts[pair] += freq
                where[pair].add(index)
                changed.add(pair)
        pair_counts.pop(best, None)
        for pair in changed - {best}:
            heapq.heappush(heap, (-pair_counts[pair], pair))
    return tokens


def ranks_file_text(tokens: list[bytes]) -> str:
    """The tiktoken ranks format: `base64(token) rank` per line, in rank order."""
    return "".join(f"{base64.b64encode(token).decode('ascii')} {rank}\n" for rank, token in enumerate(tokens))


def build_ranks_file(path: str, n_ranks: int = DEFAULT_RANKS) -> str:
    """Write the tiny GLM-4 ranks file and return its path. `path` is a directory (the file gets its official name,
    tokenizer.model, there) or the file path itself."""
    with open(CORPUS_FILE, encoding="utf-8") as handle:
        text = handle.read()
    if os.path.isdir(path):
        path = os.path.join(path, GLM4_TOKENIZER_FILE)
    with open(path, "w", encoding="ascii") as handle:
        handle.write(ranks_file_text(train_ranks(text, n_ranks)))
    return path
