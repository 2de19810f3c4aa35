"""Tokenizers of ChatGLM-6B (`glm`), ChatGLM2-6B (`glm2`) and ChatGLM3-6B (`glm3`).

The three classes load the sentencepiece file of an official checkpoint directory as it is (no `trust_remote_code`,
no `.py` file of the checkpoint is imported) and give the same ids as the official tokenizers:

- `ChatGLMTokenizer` reads `ice_text.model`. The special tokens are pieces of that file; with the official v1.1 file
  (vocabulary 130528, `num_image_tokens` 0) they are [MASK] 130000, [gMASK] 130001, <sop> (bos) 130004,
  <eop> (eos) 130005, and <pad> 3. Newlines, tabs and runs of spaces are rewritten to the pieces <n>, <|tab|> and
  <|blank_n|> before sentencepiece sees the text, and back when decoding.
- `ChatGLM2Tokenizer` reads `tokenizer.model` (n pieces) and appends [MASK] n, [gMASK] n+1, [sMASK] n+2, sop n+3,
  eop n+4; bos, eos and pad are the file's <s>, </s> and <unk>. With the official file (n = 64789): [MASK] 64789,
  [gMASK] 64790, [sMASK] 64791, sop 64792, eop 64793, bos 1, eos 2, pad 0.
- `ChatGLM3Tokenizer` is ChatGLM2Tokenizer plus <|system|> n+5, <|user|> n+6, <|assistant|> n+7 and
  <|observation|> n+8 (official: 64794 to 64797).

No special id is written in this module: they are looked up in the vocabulary file (glm) or counted from its size
(glm2/glm3), so the tiny tokenizers of `model.sp_build` get the same layout with small ids.

All three pad on the left, return a 2-D attention mask (1 = real token) and offer `encode_text(text)`, the ids of
plain text without any special token, which the chat templates of `model/template.py` are built from.

Plain text is plain text: no string inside it ("[gMASK]", "<sop>", "</s>", "<|user|>" ...) ever becomes a special
id, in any mode and through any entry point (`tokenizer(text)`, `encode`, `tokenize`, `encode_text`). Special ids
come only from `build_inputs_with_special_tokens` and the templates (`get_command`). This is what THUDM's ChatGLM2/3
tokenizers do; THUDM's ChatGLM-6B tokenizer (under the transformers 4.x it was written for) splits the text of its
registered special tokens [MASK], <sop>, <eop>, <unk>, <pad> out of the input, which lets user text inject control
tokens; we deliberately keep those strings plain text too. ChatGLM-6B's whitespace pieces are not control tokens:
the text "<n>" or "<|blank_4|>" encodes to the same piece as a newline or four spaces, exactly as THUDM's.

Decoding follows the official tokenizers (see `_decode`): every id becomes its piece (ChatGLM2: '' for the appended
tokens and for bos/eos/pad; ChatGLM3: the appended tokens by name, '' for bos/eos/pad) and the whole list goes through
one sentencepiece `decode_pieces` call, so a token after a special one keeps its leading space ("[gMASK]sop 你好");
ChatGLM-6B then applies transformers 4.x's default `clean_up_tokenization_spaces` (" ." -> "." ...), which THUDM's
ChatGLM-6B tokenizer leaves on; the current ChatGLM2-6B and ChatGLM3-6B tokenizers turn it off (their `__init__`
default, since chatglm2-6b's revision "Fix clean_up_tokenization_spaces", July 2023), so " !" stays " !".
"""
from __future__ import annotations

import os
import re
import shutil

from sentencepiece import SentencePieceProcessor
from transformers import PreTrainedTokenizer
from transformers.utils import logging

logger = logging.get_logger(__name__)

GLM_TOKENIZER_FILE = "ice_text.model"
GLM2_TOKENIZER_FILE = "tokenizer.model"

# Pieces of ice_text.model that follow its text vocabulary, in this order (official ids 130000..130007).
GLM_SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>")
GLM_MAX_BLANK_LENGTH = 80
GLM_NEWLINE_TOKEN = "<n>"
GLM_TAB_TOKEN = "<|tab|>"

# Tokens that ChatGLM2/3 append after the sentencepiece vocabulary, in id order.
GLM2_SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
GLM3_ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")

# Keys that `from_pretrained` or official tokenizer_config.json files pass along but that mean nothing to our
# classes; dropped so that `save_pretrained` does not write them back (an `auto_map` pointing at the official
# tokenization_chatglm.py would be wrong in a directory that does not ship it).
_IGNORED_INIT_KWARGS = ("auto_map", "is_local", "local_files_only", "tokenizer_class")


def glm_blank_token(length: int) -> str:
    """The ChatGLM-6B piece standing for a run of `length` spaces (2 <= length <= 80)."""
    return f"<|blank_{length}|>"


def glm_whitespace_tokens(max_blank_length: int = GLM_MAX_BLANK_LENGTH) -> list[str]:
    """The pieces ChatGLM-6B rewrites whitespace into: <n>, <|tab|>, <|blank_2|> ... <|blank_80|>."""
    return [GLM_NEWLINE_TOKEN, GLM_TAB_TOKEN] + [glm_blank_token(n) for n in range(2, max_blank_length + 1)]


def glm_preprocess(text: str, max_blank_length: int = GLM_MAX_BLANK_LENGTH) -> str:
    """Rewrite newlines, tabs and runs of spaces into ChatGLM-6B's whitespace pieces.

    Longest runs first, as the official tokenizer does, so that 5 spaces become <|blank_5|> and not
    <|blank_4|> plus a space; runs longer than `max_blank_length` are split greedily.
    """
    text = text.replace("\n", GLM_NEWLINE_TOKEN).replace("\t", GLM_TAB_TOKEN)
    for length in range(max_blank_length, 1, -1):
        text = text.replace(" " * length, glm_blank_token(length))
    return text


def glm_postprocess(text: str, max_blank_length: int = GLM_MAX_BLANK_LENGTH) -> str:
    """Inverse of `glm_preprocess` on decoded text."""
    text = text.replace(GLM_NEWLINE_TOKEN, "\n").replace(GLM_TAB_TOKEN, "\t")
    # Ascending like the official decoder; the order does not matter since no blank piece contains another.
    for length in range(2, max_blank_length + 1):
        text = text.replace(glm_blank_token(length), " " * length)
    return text


def clean_up_spaces(text: str) -> str:
    """transformers 4.x's `clean_up_tokenization`, which THUDM's ChatGLM-6B tokenizer applies when decoding (its
    config leaves `clean_up_tokenization_spaces` at its 4.x default, True; ChatGLM2/3 and GLM-4 turn it off): the
    space before . ? ! , and before the English contractions goes. Written out here so that it cannot change under us."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


def load_sentencepiece(path: str, checkpoint: str) -> SentencePieceProcessor:
    """Load a sentencepiece model, with one-line errors instead of sentencepiece's own.

    `checkpoint` names the checkpoint kind in the message ("ChatGLM-6B", "ChatGLM2/3").
    """
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: not a {checkpoint} checkpoint directory")
    try:
        return SentencePieceProcessor(model_file=path)
    except (RuntimeError, OSError) as error:
        # A ValueError, not the RuntimeError sentencepiece raises: transformers' `_from_pretrained` rewrites the
        # latter into a misleading message about TikToken.
        raise ValueError(f"{path} is not a sentencepiece model: {error}") from None


class VocabFileMixin:
    """Loading from and saving to a checkpoint directory by the one vocabulary file every ChatGLM tokenizer reads
    (`vocab_files_names["vocab_file"]`), for the sentencepiece tokenizers and GLM-4's tiktoken one alike.
    `checkpoint_kind` names the checkpoint in errors."""

    checkpoint_kind = "ChatGLM"

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *init_inputs, **kwargs):
        """Load from a checkpoint directory, official or saved by `save_pretrained`.

        A local directory must hold the official vocabulary file; its path is passed explicitly because
        transformers' own lookup would otherwise fall back to any `tokenizer.model` it finds in the directory.
        """
        path = os.fspath(pretrained_model_name_or_path)
        if os.path.isdir(path) and kwargs.get("vocab_file") is None:
            vocab_file = os.path.join(path, cls.vocab_files_names["vocab_file"])
            if not os.path.isfile(vocab_file):
                raise FileNotFoundError(f"{vocab_file} not found: not a {cls.checkpoint_kind} checkpoint directory")
            kwargs["vocab_file"] = vocab_file
        return super().from_pretrained(pretrained_model_name_or_path, *init_inputs, **kwargs)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        """Copy the vocabulary file, byte for byte, under its official name (or into `save_directory` if that is
        a file path)."""
        if os.path.isdir(save_directory):
            name = self.vocab_files_names["vocab_file"]
            target = os.path.join(save_directory, f"{filename_prefix}-{name}" if filename_prefix else name)
        else:
            target = save_directory
        # Saving back into the directory the tokenizer was loaded from: the file is already there.
        if not (os.path.exists(target) and os.path.samefile(self.vocab_file, target)):
            shutil.copyfile(self.vocab_file, target)
        return (target,)


class _SentencePieceTokenizer(VocabFileMixin, PreTrainedTokenizer):
    """What the three sentencepiece ChatGLM tokenizers share: the vocabulary file, left padding and decoding.

    Subclasses set `vocab_files_names` and `checkpoint_kind` and implement the id <-> piece mapping, `encode_text`,
    `build_inputs_with_special_tokens` and the decode hooks `_decode_piece`, `_skipped_ids` and
    `_pieces_to_text`.
    """

    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "left"

    def _load_vocab_file(self, vocab_file: str | None, kwargs: dict) -> None:
        """Load the sentencepiece file; called by subclasses before `super().__init__`, which needs the vocab."""
        if vocab_file is None:
            # from_pretrained on a hub name whose repository lacks the file: name the file we looked for.
            vocab_file = os.path.join(kwargs.get("name_or_path", ""), self.vocab_files_names["vocab_file"])
        self.vocab_file = vocab_file
        self.sp_model = load_sentencepiece(vocab_file, self.checkpoint_kind)
        for key in _IGNORED_INIT_KWARGS:
            kwargs.pop(key, None)

    # -------------------------------------------------------------------------------------------- encoding
    def tokenize(self, text: str, **kwargs) -> list[str]:
        """Pieces of `text`, which is always plain text: transformers would first split out the text of registered
        special and added tokens ("<sop>", "</s>" ...) and so let user text inject control tokens; we never do."""
        kwargs.pop("split_special_tokens", None)
        text, kwargs = self.prepare_for_tokenization(text, **kwargs)
        return self._tokenize(text)

    def encode_text(self, text: str) -> list[int]:
        """Ids of plain `text`, without special tokens; special-token strings inside it are not recognised."""
        raise NotImplementedError

    def _special_ids(self) -> set[int]:
        """Every id that is a control token rather than text (marked 1 by `get_special_tokens_mask` on an already
        formatted sequence)."""
        return set(self.all_special_ids)

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False) -> list[int]:
        """1 for the special tokens `build_inputs_with_special_tokens` adds (or, for an already formatted
        sequence, for every special id), 0 for text tokens."""
        if already_has_special_tokens:
            if token_ids_1 is not None:
                raise ValueError("token_ids_1 must be None when the sequence already has its special tokens")
            special = self._special_ids()
            return [1 if int(index) in special else 0 for index in token_ids_0]
        marker = -1  # never a real id: marks where the text tokens go
        built = self.build_inputs_with_special_tokens(
            [marker] * len(token_ids_0), None if token_ids_1 is None else [marker] * len(token_ids_1)
        )
        return [0 if index == marker else 1 for index in built]

    # -------------------------------------------------------------------------------------------- decoding
    def _decode_piece(self, index: int) -> str:
        """What the official tokenizer hands sentencepiece for token id `index` when decoding."""
        raise NotImplementedError

    def _skipped_ids(self, skip_special_tokens: bool) -> set[int]:
        """Ids that decoding leaves out."""
        return set()

    def _pieces_to_text(self, pieces: list[str]) -> str:
        return self.sp_model.decode_pieces(pieces)

    def _decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces=None, **kwargs):
        """Decode as the official tokenizers do: each id to its piece, all pieces through ONE sentencepiece
        `decode_pieces` call (only the very first piece loses its leading "▁"; byte-fallback pieces join into
        characters), then the optional clean-up of spaces before punctuation."""
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        skipped = self._skipped_ids(skip_special_tokens)
        pieces = [self._decode_piece(index) for index in map(int, token_ids) if index not in skipped]
        text = self._pieces_to_text(pieces)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        return clean_up_spaces(text) if clean_up_tokenization_spaces else text


class ChatGLMTokenizer(_SentencePieceTokenizer):
    """Tokenizer of ChatGLM-6B (v1.1 layout), reading `ice_text.model`.

    Token id = sentencepiece id + `num_image_tokens`; ids below `num_image_tokens` are the image tokens <image_N>
    (the official v1.1 tokenizer_config.json sets 0, giving a vocabulary of 130528; v1.0 used 20000). Official ids:
    [MASK] 130000, [gMASK] 130001, <sop> = bos 130004, <eop> = eos 130005, <pad> 3, </s> (end token) 2, <unk> 0.

    `tokenizer(text)` gives `text ids + [gMASK] <sop>` (a pair: `+ second ids + <eop>`), as the official tokenizer.
    """

    vocab_files_names = {"vocab_file": GLM_TOKENIZER_FILE}
    checkpoint_kind = "ChatGLM-6B"

    def __init__(
        self,
        vocab_file=None,
        do_lower_case=False,
        remove_space=False,
        bos_token="<sop>",
        eos_token="<eop>",
        end_token="</s>",
        mask_token="[MASK]",
        gmask_token="[gMASK]",
        padding_side="left",
        pad_token="<pad>",
        unk_token="<unk>",
        num_image_tokens=0,
        max_blank_length=GLM_MAX_BLANK_LENGTH,
        clean_up_tokenization_spaces=True,
        **kwargs,
    ):
        self._load_vocab_file(vocab_file, kwargs)
        self.do_lower_case = do_lower_case
        self.remove_space = remove_space
        self.num_image_tokens = int(num_image_tokens)
        self.max_blank_length = int(max_blank_length)
        super().__init__(
            do_lower_case=do_lower_case,
            remove_space=remove_space,
            padding_side=padding_side,
            bos_token=bos_token,
            eos_token=eos_token,
            end_token=end_token,
            mask_token=mask_token,
            gmask_token=gmask_token,
            pad_token=pad_token,
            unk_token=unk_token,
            num_image_tokens=num_image_tokens,
            max_blank_length=max_blank_length,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )

    # ------------------------------------------------------------------------------------------ vocabulary
    @property
    def vocab_size(self) -> int:
        """Image tokens plus the pieces of ice_text.model (130528 for the official v1.1 checkpoint)."""
        return self.num_image_tokens + self.sp_model.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        vocab = {f"<image_{index}>": index for index in range(self.num_image_tokens)}
        offset = self.num_image_tokens
        vocab.update({self.sp_model.id_to_piece(i): i + offset for i in range(self.sp_model.get_piece_size())})
        vocab.update(self._added_tokens_encoder)
        return vocab

    def _convert_token_to_id(self, token: str) -> int:
        if token.startswith("<image_") and token.endswith(">") and token[7:-1].isdigit():
            index = int(token[7:-1])
            if index < self.num_image_tokens:
                return index
        return self.sp_model.piece_to_id(token) + self.num_image_tokens

    def _convert_id_to_token(self, index: int) -> str:
        if 0 <= index < self.num_image_tokens:
            return f"<image_{index}>"
        sp_index = self._sp_index(index)
        return self.sp_model.id_to_piece(sp_index) if sp_index is not None else ""

    @property
    def gmask_token_id(self) -> int | None:
        """Id of [gMASK] (official: 130001), the mask ChatGLM-6B generates after."""
        return None if self.gmask_token is None else self.convert_tokens_to_ids(self.gmask_token)

    @property
    def end_token_id(self) -> int | None:
        """Id of the end token </s> (official: 2)."""
        return None if self.end_token is None else self.convert_tokens_to_ids(self.end_token)

    def get_command(self, token: str) -> int:
        """Id of a special token by name: one of GLM_SPECIAL_TOKENS or this tokenizer's special tokens, also under
        the ChatGLM2 names "sop", "eop", "<bos>", "<eos>", "<pad>" so that callers can treat all modes alike."""
        aliases = {"sop": "<sop>", "eop": "<eop>", "<bos>": self.bos_token, "<eos>": self.eos_token,
                   "<pad>": self.pad_token}
        token = aliases.get(token, token)
        if token not in GLM_SPECIAL_TOKENS and token not in self.all_special_tokens:
            raise KeyError(f"{token!r} is not a special token of {type(self).__name__}")
        return self.convert_tokens_to_ids(token)

    def _special_ids(self) -> set[int]:
        offset = self.num_image_tokens
        file_specials = {self.sp_model.piece_to_id(token) + offset for token in GLM_SPECIAL_TOKENS}
        # piece_to_id answers <unk> for a token missing from the file; <unk> is special anyway.
        return set(self.all_special_ids) | file_specials

    # ------------------------------------------------------------------------------------------- encoding
    def preprocess_text(self, text: str) -> str:
        """The official optional normalisations (both off in the official tokenizer_config.json)."""
        if self.remove_space:
            text = " ".join(text.strip().split())
        if self.do_lower_case:
            text = text.lower()
        return text

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        text = glm_preprocess(self.preprocess_text(text), self.max_blank_length)
        return self.sp_model.encode(text, out_type=str)

    def encode_text(self, text: str) -> list[int]:
        """Ids of plain text, whitespace rewritten as the official tokenizer does ("a\\n    b" gives the pieces
        "▁a", "<n>", "<|blank_4|>", "b"); sentencepiece adds its dummy-prefix "▁" at the start."""
        text = glm_preprocess(self.preprocess_text(text), self.max_blank_length)
        return [index + self.num_image_tokens for index in self.sp_model.encode(text)]

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None):
        """`ids + [gMASK] <sop>`; for a pair `ids_0 + [gMASK] <sop> + ids_1 + <eop>` (official layout)."""
        ids = token_ids_0 + [self.gmask_token_id, self.bos_token_id]
        if token_ids_1 is not None:
            ids = ids + token_ids_1 + [self.eos_token_id]
        return ids

    # ------------------------------------------------------------------------------------------- decoding
    def _sp_index(self, index: int) -> int | None:
        """The sentencepiece id behind token id `index` (after the image tokens), or None outside the file."""
        sp_index = index - self.num_image_tokens
        return sp_index if 0 <= sp_index < self.sp_model.get_piece_size() else None

    def _decode_piece(self, index: int) -> str:
        return self._convert_id_to_token(index)

    def _skipped_ids(self, skip_special_tokens: bool) -> set[int]:
        # The official decoder always removes padding; skip_special_tokens drops the tokens it registers as special
        # (bos <sop>, eos <eop>, unk, pad, mask [MASK]). [gMASK] and the other specials of the file are control
        # pieces, which sentencepiece decodes to '' anyway.
        skipped = {self.pad_token_id}
        if skip_special_tokens:
            skipped |= {self.bos_token_id, self.eos_token_id, self.unk_token_id, self.mask_token_id}
        return skipped

    def _pieces_to_text(self, pieces: list[str]) -> str:
        return glm_postprocess(self.sp_model.decode_pieces(pieces), self.max_blank_length)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return glm_postprocess(self.sp_model.decode_pieces(tokens), self.max_blank_length)


class AppendedSpecialTokensMixin:
    """The ChatGLM2/3 and GLM-4 layout: the vocabulary file's n_words entries, then `special_tokens` appended from id
    n_words on; every input starts with `get_prefix_tokens()` ([gMASK] and sop / <sop>)."""

    @property
    def vocab_size(self) -> int:
        """The file's entries plus the appended special tokens (ChatGLM2-6B 64798, GLM-4-9B 151343)."""
        return self.n_words + len(self.special_tokens)

    @property
    def gmask_token_id(self) -> int:
        """Id of [gMASK] (official: ChatGLM2/3 64790, GLM-4 151331)."""
        return self.special_tokens["[gMASK]"]

    def _appended_id(self, token: str) -> int:
        """Id of an appended special token by its name; a KeyError naming the tokenizer otherwise."""
        if token not in self.special_tokens:
            raise KeyError(f"{token!r} is not a special token of {type(self).__name__}")
        return self.special_tokens[token]

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None):
        """`prefix + ids`; for a pair `prefix + ids_0 + ids_1 + eos` (official layout)."""
        ids = self.get_prefix_tokens() + token_ids_0
        if token_ids_1 is not None:
            ids = ids + token_ids_1 + [self.eos_token_id]
        return ids


class ChatGLM2Tokenizer(AppendedSpecialTokensMixin, _SentencePieceTokenizer):
    """Tokenizer of ChatGLM2-6B, reading `tokenizer.model` (n pieces, official n = 64789).

    Appended after the file's pieces: [MASK] n, [gMASK] n+1, [sMASK] n+2, sop n+3, eop n+4 (official 64789 to
    64793). eos is the file's </s> (2) and pad its <unk> (0), as in the official tokenizer; like there, no bos or unk
    token is registered (`bos_token_id` and `unk_token_id` are None; `get_command("<bos>")` gives the file's <s>, 1).
    `tokenizer(text)` gives `[gMASK] sop + text ids` (a pair: `+ second ids + eos`).

    The appended tokens are not registered as transformers special tokens, so text such as "sop" or "[gMASK]" is
    tokenized as plain text (like the official tokenizer); use `get_command(name)` for their ids.
    """

    vocab_files_names = {"vocab_file": GLM2_TOKENIZER_FILE}
    checkpoint_kind = "ChatGLM2/3"
    appended_tokens = GLM2_SPECIAL_TOKENS
    # ChatGLM2's decoder renders the appended tokens as '', ChatGLM3's as their names.
    render_appended_tokens = False

    def __init__(self, vocab_file=None, padding_side="left", clean_up_tokenization_spaces=False, **kwargs):
        # False as in THUDM's current chatglm2-6b tokenizer (revision "Fix clean_up_tokenization_spaces", July 2023):
        # decoding keeps the space before . ? ! , (a tokenizer_config.json that says true turns the clean-up on).
        self._load_vocab_file(vocab_file, kwargs)
        sp = self.sp_model
        self.n_words = sp.get_piece_size()
        self.special_tokens = {token: self.n_words + i for i, token in enumerate(self.appended_tokens)}
        self.index_special_tokens = {index: token for token, index in self.special_tokens.items()}
        self._warn_on_shadowed_pieces()
        # eos and pad are fixed by the file, whatever a tokenizer_config.json says (ours of earlier versions wrote
        # all four); bos and unk stay unregistered, as in the official tokenizer.
        self._bos_id = sp.bos_id()
        self._pad_id = sp.unk_id() if sp.pad_id() < 0 else sp.pad_id()
        fixed = {"eos_token": sp.eos_id(), "pad_token": self._pad_id, "bos_token": None, "unk_token": None}
        for name, index in fixed.items():
            piece = sp.id_to_piece(index) if index is not None else None
            given = kwargs.pop(name, None)
            if given is not None and index is not None and str(given) != piece:
                logger.warning(f"{name}={given!r} ignored: {self.vocab_file} defines it as {piece!r}")
            if piece is not None:
                kwargs[name] = piece
        super().__init__(padding_side=padding_side, clean_up_tokenization_spaces=clean_up_tokenization_spaces,
                         **kwargs)

    def _warn_on_shadowed_pieces(self) -> None:
        """The official tokenizers look special names up before pieces; say so if a file piece gets hidden."""
        unk = self.sp_model.unk_id()
        for token in self.special_tokens:
            if self.sp_model.piece_to_id(token) != unk:
                logger.warning(f"piece {token!r} of {self.vocab_file} is shadowed by the special token {token!r}")

    # ------------------------------------------------------------------------------------------ vocabulary
    def get_vocab(self) -> dict[str, int]:
        vocab = {self.sp_model.id_to_piece(i): i for i in range(self.n_words)}
        vocab.update(self.special_tokens)
        vocab.update(self._added_tokens_encoder)
        return vocab

    def get_command(self, token: str) -> int:
        """Id of a special token: "<bos>", "<eos>", "<pad>" or one of the appended tokens ("[gMASK]", "sop" ...)."""
        commands = {"<bos>": self._bos_id, "<eos>": self.eos_token_id, "<pad>": self.pad_token_id}
        return commands[token] if token in commands else self._appended_id(token)

    @property
    def sop_token_id(self) -> int:
        """Id of sop (official: 64792)."""
        return self.special_tokens["sop"]

    @property
    def eop_token_id(self) -> int:
        """Id of eop (official: 64793)."""
        return self.special_tokens["eop"]

    def _convert_token_to_id(self, token: str) -> int:
        # Special names first, as the official tokenizer (see `_warn_on_shadowed_pieces`).
        if token in self.special_tokens:
            return self.special_tokens[token]
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        if index in self.index_special_tokens:
            return self.index_special_tokens[index]
        return self.sp_model.id_to_piece(index) if 0 <= index < self.n_words else ""

    def _special_ids(self) -> set[int]:
        return {self._bos_id, self.eos_token_id, self._pad_id} | set(self.index_special_tokens)

    # ------------------------------------------------------------------------------------------- encoding
    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.sp_model.encode(text, out_type=str)

    def encode_text(self, text: str) -> list[int]:
        """`sp.encode(text)`: ids of plain text; role or mask names inside it stay plain text."""
        return self.sp_model.encode(text)

    def get_prefix_tokens(self) -> list[int]:
        """[gMASK] sop, which starts every ChatGLM2/3 input."""
        return [self.get_command("[gMASK]"), self.get_command("sop")]

    # ------------------------------------------------------------------------------------------- decoding
    def _decode_piece(self, index: int) -> str:
        # Official: the appended tokens are '' (ChatGLM2) or their names (ChatGLM3); bos, eos and pad are ''. Ids
        # outside the vocabulary (a padded embedding row) give '' too.
        if index in self.index_special_tokens:
            return self.index_special_tokens[index] if self.render_appended_tokens else ""
        if index in (self._bos_id, self.eos_token_id, self._pad_id) or not 0 <= index < self.n_words:
            return ""
        return self.sp_model.id_to_piece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        # The official decode of tokens: one sentencepiece call; appended names pass through as text (ChatGLM3) or
        # vanish (ChatGLM2), as `_decode_piece` renders them.
        if not self.render_appended_tokens:
            tokens = ["" if token in self.special_tokens else token for token in tokens]
        return self.sp_model.decode_pieces(tokens)


class ChatGLM3Tokenizer(ChatGLM2Tokenizer):
    """Tokenizer of ChatGLM3-6B: ChatGLM2Tokenizer plus the role tokens <|system|> n+5, <|user|> n+6,
    <|assistant|> n+7 and <|observation|> n+8 (official 64794 to 64797).

    Decoding renders the appended tokens as their text, also with `skip_special_tokens=True`: as in the official
    tokenizer they are not registered special tokens (chat() cuts the answer at its stop tokens instead).
    With `encode_special_tokens=True` (off by default, as official), role names written in the text are encoded
    as the role tokens; `encode_text` never does.
    """

    appended_tokens = GLM2_SPECIAL_TOKENS + GLM3_ROLE_TOKENS
    render_appended_tokens = True

    def __init__(self, vocab_file=None, padding_side="left", clean_up_tokenization_spaces=False,
                 encode_special_tokens=False, **kwargs):
        self.encode_special_tokens = encode_special_tokens
        self._role_pattern = re.compile("|".join(re.escape(token) for token in GLM3_ROLE_TOKENS))
        super().__init__(vocab_file=vocab_file, padding_side=padding_side,
                         clean_up_tokenization_spaces=clean_up_tokenization_spaces,
                         encode_special_tokens=encode_special_tokens, **kwargs)

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        if not self.encode_special_tokens:
            return self.sp_model.encode(text, out_type=str)
        tokens, start = [], 0
        for match in self._role_pattern.finditer(text):
            if start < match.start():
                tokens.extend(self.sp_model.encode(text[start:match.start()], out_type=str))
            tokens.append(match.group())
            start = match.end()
        if start < len(text):
            tokens.extend(self.sp_model.encode(text[start:], out_type=str))
        return tokens
