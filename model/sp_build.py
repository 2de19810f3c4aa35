"""Build small real sentencepiece files with the layout of the official ChatGLM tokenizer files.

`python -m model.tiny` and the tests need a tokenizer without the multi-megabyte official files. This module trains
one on the bundled `model/tiny_corpus.txt` (in memory, single thread, so the same bytes on every run, well under a
second) with byte fallback, so that any text (Chinese, English, emoji) encodes without <unk>:

- `glm` (ice_text.model, num_image_tokens 0): <unk> 0, <s> 1, </s> 2, <pad> 3 (pad 3 as official), the
  whitespace pieces <n>, <|tab|>, <|blank_2|> .. <|blank_80|> as user-defined pieces from id 4, then the byte pieces
  and the learned text pieces, and last the eight specials [MASK], [gMASK], [sMASK], <unused_0>, <sop>, <eop>,
  <ENC>, <dBLOCK> (official 130000..130007, here vocab_size-8 .. vocab_size-1).
- `glm2` / `glm3` (tokenizer.model): <unk> 0 (also the pad), <s> 1, </s> 2, the byte pieces from 3, then the learned
  pieces. The special tokens are not in the file: the tokenizer appends them after its last piece.

With the default vocab_size of 1024 the tiny tokenizers therefore have: glm [MASK] 1016, [gMASK] 1017, <sop> 1020,
<eop> 1021, pad 3 (vocabulary 1024); glm2 [MASK] 1024, [gMASK] 1025, [sMASK] 1026, sop 1027, eop 1028, bos 1, eos 2,
pad 0 (vocabulary 1029); glm3 the same plus <|system|> 1029, <|user|> 1030, <|assistant|> 1031, <|observation|> 1032
(vocabulary 1033).

Both files use the identity normalisation and keep whitespace as it is, so decoding gives back the encoded text
(the official ice_text.model NFKC-normalises, turning full-width punctuation into ASCII).
"""
from __future__ import annotations

import io
import os

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from .tokenization import (
    GLM2_SPECIAL_TOKENS,
    GLM2_TOKENIZER_FILE,
    GLM3_ROLE_TOKENS,
    GLM_SPECIAL_TOKENS,
    GLM_TOKENIZER_FILE,
    glm_preprocess,
    glm_whitespace_tokens,
)

CORPUS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_corpus.txt")
TOKENIZER_FILES = {"glm": GLM_TOKENIZER_FILE, "glm2": GLM2_TOKENIZER_FILE, "glm3": GLM2_TOKENIZER_FILE}
DEFAULT_VOCAB_SIZE = 1024


def _corpus_lines(mode: str) -> list[str]:
    """Lines of the bundled corpus, whitespace-rewritten for glm as its tokenizer will present text."""
    with open(CORPUS_FILE, encoding="utf-8") as handle:
        lines = [line for line in handle.read().splitlines() if line.strip()]
    if mode == "glm":
        lines = [glm_preprocess(line) for line in lines]
    return lines


def _train(lines: list[str], vocab_size: int, **options) -> model_pb2.ModelProto:
    """Train in memory and return the parsed model."""
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=writer,
        vocab_size=vocab_size,
        byte_fallback=True,
        # Rare characters are left to byte fallback rather than taking a slot of the small vocabulary each.
        character_coverage=0.98,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        num_threads=1,  # one thread: the same file on every run
        minloglevel=2,
        **options,
    )
    proto = model_pb2.ModelProto()
    proto.ParseFromString(writer.getvalue())
    return proto


def build_tokenizer_proto(mode: str, vocab_size: int = DEFAULT_VOCAB_SIZE) -> bytes:
    """Serialized sentencepiece model of `vocab_size` pieces in the official layout of `mode` (see module doc)."""
    if mode not in TOKENIZER_FILES:
        raise ValueError(f"unknown mode {mode!r}: expected one of {', '.join(TOKENIZER_FILES)}")
    try:
        return _build(mode, vocab_size)
    except RuntimeError as error:
        # Typically "Vocabulary size is smaller than required_chars": keep sentencepiece's reason, on one line.
        raise ValueError(f"cannot build a {vocab_size}-piece {mode} model: {str(error).splitlines()[0]}") from None


def _build(mode: str, vocab_size: int) -> bytes:
    """`build_tokenizer_proto` without the argument checks."""
    if mode == "glm":
        proto = _train(
            _corpus_lines(mode),
            vocab_size - len(GLM_SPECIAL_TOKENS),
            model_type="unigram",
            unk_id=0, bos_id=1, eos_id=2, pad_id=3,
            user_defined_symbols=glm_whitespace_tokens(),
        )
        reserved = set(GLM_SPECIAL_TOKENS)
    else:
        proto = _train(
            _corpus_lines(mode),
            vocab_size,
            model_type="bpe",
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            split_digits=True,
            allow_whitespace_only_pieces=True,
        )
        # The tokenizer looks these names up before the pieces: a learned piece "sop" would be unreachable.
        reserved = set(GLM2_SPECIAL_TOKENS + GLM3_ROLE_TOKENS)
    clashes = reserved & {piece.piece for piece in proto.pieces}
    if clashes:
        raise RuntimeError(f"learned pieces {sorted(clashes)} clash with the special tokens of {mode}")
    if mode == "glm":
        # The specials go after the text vocabulary, as in the official file. CONTROL pieces: sentencepiece never
        # produces them from text and decodes them to ''.
        for token in GLM_SPECIAL_TOKENS:
            piece = proto.pieces.add()
            piece.piece, piece.score, piece.type = token, 0.0, model_pb2.ModelProto.SentencePiece.CONTROL
    if len(proto.pieces) != vocab_size:
        raise RuntimeError(f"built {len(proto.pieces)} pieces instead of {vocab_size}")
    return proto.SerializeToString()


def build_tokenizer_file(mode: str, path: str, vocab_size: int = DEFAULT_VOCAB_SIZE) -> str:
    """Write the tiny tokenizer file of `mode` ("glm", "glm2", "glm3") and return its path.

    `path` is either a directory (the file gets its official name there: ice_text.model or tokenizer.model) or
    the file path itself. `vocab_size` is the number of pieces in the file: at least 871 for glm and 781 for
    glm2/glm3 (the frequent characters of the corpus, 256 byte pieces and, for glm, 81 whitespace and 8 special
    pieces); a smaller one raises ValueError.
    """
    data = build_tokenizer_proto(mode, vocab_size)
    if os.path.isdir(path):
        path = os.path.join(path, TOKENIZER_FILES[mode])
    with open(path, "wb") as handle:
        handle.write(data)
    return path
