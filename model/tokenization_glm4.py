"""Tokenizer of GLM-4-9B (`glm4`): the official checkpoint's `tokenizer.model`, a tiktoken ranks file, read as it is.

- `tokenizer.model` holds one `base64(token bytes) rank` line per token (151,329 ranks in the official file). The
  byte-level BPE itself is the `tiktoken` package's, over the pre-tokenisation regex `GLM4_PATTERN` (OpenAI's
  cl100k pattern in the form THUDM's tokenizer uses).
- The special tokens are not in the file: they are appended from n = number of ranks, in the order of
  `GLM4_SPECIAL_TOKENS` (official ids 151329 <|endoftext|> ... 151342 <|end_of_video|>). No special id is written
  in this module; they are counted from the file, so a tiny ranks file (`model.tiktoken_build`) gets the same
  layout with small ids.
- There is no BOS: `[gMASK] <sop>` starts every input (`tokenizer(text)` gives `[gMASK] <sop> + text ids`).
  eos = pad = <|endoftext|>; padding is on the left with a 2-D attention mask (1 = real token).
- Plain text never yields a special id: `<|user|>` typed by a user is encoded as the characters it is made of (the
  official build_chat_input encodes message text with no special token allowed either). Special ids come only from
  the chat template (`model/template.py`) through `get_command(name)`.
- Decoding renders the special tokens as their names (`skip_special_tokens=True` drops them); the bytes of
  consecutive text tokens are joined before UTF-8 decoding, so characters split across tokens come back whole.
"""
from __future__ import annotations

import base64
import binascii
import os

import tiktoken
from transformers import PreTrainedTokenizer

from .tokenization import _IGNORED_INIT_KWARGS, AppendedSpecialTokensMixin, VocabFileMixin, clean_up_spaces

GLM4_TOKENIZER_FILE = "tokenizer.model"

# THUDM's GLM-4 pre-tokenisation: OpenAI's cl100k regex as first published (tiktoken's current cl100k_base writes it
# with possessive quantifiers, which splits a few whitespace runs differently).
GLM4_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Appended after the ranks of tokenizer.model, in id order (official: 151329 .. 151342).
GLM4_SPECIAL_TOKENS = ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                       "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
                       "<|begin_of_video|>", "<|end_of_video|>")


def load_ranks(path: str) -> dict[bytes, int]:
    """Read a tiktoken ranks file, with one-line errors naming the file and line."""
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: not a GLM-4 checkpoint directory")
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
            except (IndexError, ValueError, binascii.Error):
                # A ValueError: transformers rewrites other exceptions from a tokenizer's __init__ into a misleading
                # message (see load_sentencepiece in tokenization.py).
                raise ValueError(f"{path}:{number}: not a tiktoken ranks line ('base64-token rank'); is this the "
                                 f"GLM-4 tokenizer.model?") from None
            ranks[token] = rank
    if not ranks:
        raise ValueError(f"{path}: empty tiktoken ranks file")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not 0..{len(ranks) - 1} without gaps or repeats")
    return ranks


def _byte_symbols() -> list[str]:
    """A printable character for every byte (the GPT-2 byte-to-unicode table), so token strings are reversible."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[byte] for byte in range(256)]


_BYTE_SYMBOLS = _byte_symbols()
_SYMBOL_BYTES = {symbol: byte for byte, symbol in enumerate(_BYTE_SYMBOLS)}


class ChatGLM4Tokenizer(VocabFileMixin, AppendedSpecialTokensMixin, PreTrainedTokenizer):
    """Tokenizer of GLM-4-9B / GLM-4-9B-Chat (see the module docstring for the layout)."""

    vocab_files_names = {"vocab_file": GLM4_TOKENIZER_FILE}
    checkpoint_kind = "GLM-4"
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "left"

    def __init__(self, vocab_file=None, padding_side="left", clean_up_tokenization_spaces=False, **kwargs):
        if vocab_file is None:
            vocab_file = os.path.join(kwargs.get("name_or_path", ""), GLM4_TOKENIZER_FILE)
        self.vocab_file = vocab_file
        self.mergeable_ranks = load_ranks(vocab_file)
        self.n_words = len(self.mergeable_ranks)
        self.special_tokens = {token: self.n_words + i for i, token in enumerate(GLM4_SPECIAL_TOKENS)}
        self.index_special_tokens = {index: token for token, index in self.special_tokens.items()}
        self.decoder = {rank: token for token, rank in self.mergeable_ranks.items()}
        # No special token is registered with tiktoken: it can only ever produce text ranks.
        self.encoding = tiktoken.Encoding(name="glm4", pat_str=GLM4_PATTERN, mergeable_ranks=self.mergeable_ranks,
                                          special_tokens={})
        for key in _IGNORED_INIT_KWARGS + ("bos_token", "unk_token", "split_special_tokens"):
            kwargs.pop(key, None)
        # eos and pad are <|endoftext|>, whatever a tokenizer_config.json says (the official one says the same).
        kwargs["eos_token"] = kwargs["pad_token"] = "<|endoftext|>"
        # split_special_tokens: transformers' tokenize() must not turn "<|endoftext|>" typed in text into eos.
        super().__init__(padding_side=padding_side, clean_up_tokenization_spaces=clean_up_tokenization_spaces,
                         split_special_tokens=True, **kwargs)

    # ------------------------------------------------------------------------------------------ vocabulary
    def get_vocab(self) -> dict[str, int]:
        vocab = {self._convert_id_to_token(i): i for i in range(self.vocab_size)}
        vocab.update(self._added_tokens_encoder)
        return vocab

    def get_command(self, token: str) -> int:
        """Id of a special token by its official name ("[gMASK]", "<sop>", "<|user|>" ...); "sop", "eop", "<eos>"
        and "<pad>" are accepted too, so that callers can treat all modes alike."""
        aliases = {"sop": "<sop>", "eop": "<eop>", "<eos>": "<|endoftext|>", "<pad>": "<|endoftext|>"}
        return self._appended_id(aliases.get(token, token))

    def _convert_token_to_id(self, token: str) -> int:
        if token in self.special_tokens:
            return self.special_tokens[token]
        try:
            return self.mergeable_ranks[bytes(_SYMBOL_BYTES[symbol] for symbol in token)]
        except KeyError:
            raise KeyError(f"{token!r} is no token of {self.vocab_file}") from None

    def _convert_id_to_token(self, index: int) -> str:
        if index in self.index_special_tokens:
            return self.index_special_tokens[index]
        token = self.decoder.get(index)
        return "".join(_BYTE_SYMBOLS[byte] for byte in token) if token is not None else ""

    # ------------------------------------------------------------------------------------------- encoding
    def encode_text(self, text: str) -> list[int]:
        """Ids of plain text: tiktoken's BPE over the ranks file; never a special id."""
        return self.encoding.encode_ordinary(text)

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return [self._convert_id_to_token(index) for index in self.encode_text(text)]

    def get_prefix_tokens(self) -> list[int]:
        """[gMASK] <sop>, which starts every GLM-4 input."""
        return [self.special_tokens["[gMASK]"], self.special_tokens["<sop>"]]

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False) -> list[int]:
        if already_has_special_tokens:
            if token_ids_1 is not None:
                raise ValueError("token_ids_1 must be None when the sequence already has its special tokens")
            return [1 if int(index) in self.index_special_tokens else 0 for index in token_ids_0]
        mask = [1, 1] + [0] * len(token_ids_0)
        if token_ids_1 is not None:
            mask += [0] * len(token_ids_1) + [1]
        return mask

    # ------------------------------------------------------------------------------------------- decoding
    def _decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces=None, **kwargs):
        """Text ranks are joined as bytes and decoded as UTF-8 (invalid bytes become U+FFFD); special tokens are
        rendered as their names unless skipped; ids beyond the vocabulary (the padded embedding) give ''."""
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        parts, run = [], b""
        for index in map(int, token_ids):
            token = self.decoder.get(index)
            if token is not None:
                run += token
                continue
            if run:
                parts.append(run.decode("utf-8", errors="replace"))
                run = b""
            if index in self.index_special_tokens and not skip_special_tokens:
                parts.append(self.index_special_tokens[index])
        if run:
            parts.append(run.decode("utf-8", errors="replace"))
        text = "".join(parts)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        return clean_up_spaces(text) if clean_up_tokenization_spaces else text

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self._decode(self.convert_tokens_to_ids(tokens))
