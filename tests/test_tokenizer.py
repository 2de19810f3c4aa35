"""Tokenizers of the three modes, on tiny sentencepiece files built by model.sp_build in the official layouts."""
import filecmp
import json
import os

import pytest
import torch
from sentencepiece import SentencePieceProcessor
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from model.sp_build import TOKENIZER_FILES, build_tokenizer_file, build_tokenizer_proto
from model.tokenization import (
    GLM2_SPECIAL_TOKENS,
    GLM3_ROLE_TOKENS,
    GLM_SPECIAL_TOKENS,
    ChatGLM2Tokenizer,
    ChatGLM3Tokenizer,
    ChatGLMTokenizer,
    glm_whitespace_tokens,
)

CLASSES = {"glm": ChatGLMTokenizer, "glm2": ChatGLM2Tokenizer, "glm3": ChatGLM3Tokenizer}
MODES = list(CLASSES)
TEXT = "发动机水温高，风扇低速转动。\n\t第二行：    四个空格  两个\n\n“引号”（括号）！😀 English words, 2023."

# What the official checkpoints ship as tokenizer_config.json (read without trust_remote_code).
OFFICIAL_CONFIGS = {
    "glm": {
        "name_or_path": "THUDM/chatglm-6b", "bos_token": "<sop>", "eos_token": "<eop>", "end_token": "</s>",
        "gmask_token": "[gMASK]", "mask_token": "[MASK]", "pad_token": "<pad>", "unk_token": "<unk>",
        "remove_space": False, "do_lower_case": False, "tokenizer_class": "ChatGLMTokenizer",
        "num_image_tokens": 0, "padding_side": "left",
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
    },
    "glm2": {
        "name_or_path": "THUDM/chatglm2-6b", "remove_space": False, "do_lower_case": False,
        "tokenizer_class": "ChatGLMTokenizer", "padding_side": "left",
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
    },
    "glm3": {
        "name_or_path": "THUDM/chatglm3-6b", "remove_space": False, "do_lower_case": False,
        "tokenizer_class": "ChatGLMTokenizer", "padding_side": "left", "clean_up_tokenization_spaces": False,
        "encode_special_tokens": False,
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
    },
}


@pytest.fixture(scope="module")
def checkpoint_dirs(tmp_path_factory):
    """One directory per mode holding only the tiny sentencepiece file, under its official name."""
    dirs = {}
    for mode in MODES:
        directory = tmp_path_factory.mktemp(mode)
        build_tokenizer_file(mode, str(directory))
        dirs[mode] = str(directory)
    return dirs


@pytest.fixture(scope="module")
def tokenizers(checkpoint_dirs):
    return {mode: CLASSES[mode].from_pretrained(checkpoint_dirs[mode]) for mode in MODES}


def sp_of(checkpoint_dirs, mode):
    return SentencePieceProcessor(model_file=os.path.join(checkpoint_dirs[mode], TOKENIZER_FILES[mode]))


def gmask_sop(tokenizer):
    return [tokenizer.gmask_token_id, tokenizer.get_command("sop")]


# ------------------------------------------------------------------------------------------------ layout
def test_glm_special_ids_follow_the_vocabulary_file(checkpoint_dirs, tokenizers):
    tok, sp = tokenizers["glm"], sp_of(checkpoint_dirs, "glm")
    n = sp.get_piece_size()
    # The eight specials are the last pieces of the file, in the official order, and ids are the piece ids.
    assert [sp.id_to_piece(i) for i in range(n - 8, n)] == list(GLM_SPECIAL_TOKENS)
    assert not set(GLM_SPECIAL_TOKENS) & {sp.id_to_piece(i) for i in range(n - 8)}
    assert tok.vocab_size == len(tok) == n
    assert tok.mask_token_id == sp.piece_to_id("[MASK]") == n - 8
    assert tok.gmask_token_id == sp.piece_to_id("[gMASK]") == n - 7
    assert tok.bos_token_id == sp.piece_to_id("<sop>") == n - 4
    assert tok.eos_token_id == sp.piece_to_id("<eop>") == n - 3
    assert tok.pad_token_id == 3 and tok.unk_token_id == 0 and tok.end_token_id == 2
    assert [tok.get_command(name) for name in ("[gMASK]", "sop", "eop", "<pad>")] == [n - 7, n - 4, n - 3, 3]


def test_glm_file_layout(checkpoint_dirs):
    sp = sp_of(checkpoint_dirs, "glm")
    assert [sp.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert sp.pad_id() == 3
    proto = model_pb2.ModelProto()
    with open(os.path.join(checkpoint_dirs["glm"], "ice_text.model"), "rb") as handle:
        proto.ParseFromString(handle.read())
    types = {piece.piece: piece.type for piece in proto.pieces}
    assert all(types[token] == model_pb2.ModelProto.SentencePiece.USER_DEFINED for token in glm_whitespace_tokens())
    assert sum(piece.type == model_pb2.ModelProto.SentencePiece.BYTE for piece in proto.pieces) == 256


@pytest.mark.parametrize("mode", ["glm2", "glm3"])
def test_glm2_glm3_special_ids_are_appended_after_the_file(checkpoint_dirs, tokenizers, mode):
    tok, sp = tokenizers[mode], sp_of(checkpoint_dirs, mode)
    n = sp.get_piece_size()
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    appended = GLM2_SPECIAL_TOKENS + (GLM3_ROLE_TOKENS if mode == "glm3" else ())
    assert all(sp.piece_to_id(token) == sp.unk_id() for token in appended)  # not pieces of the file
    assert [tok.get_command(token) for token in appended] == list(range(n, n + len(appended)))
    assert tok.vocab_size == len(tok) == n + len(appended)
    assert tok.gmask_token_id == n + 1 and tok.get_command("sop") == n + 3 and tok.get_command("eop") == n + 4
    # As official: eos and pad registered, bos and unk not (their ids are None); get_command names the file's <s>.
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (None, 2, 0, None)
    assert [tok.get_command(name) for name in ("<bos>", "<eos>", "<pad>")] == [1, 2, 0]
    with pytest.raises(KeyError):
        tok.get_command("<|user|>" if mode == "glm2" else "<sop>")


def test_glm3_role_tokens(tokenizers, checkpoint_dirs):
    tok = tokenizers["glm3"]
    n = sp_of(checkpoint_dirs, "glm3").get_piece_size()
    assert [tok.get_command(role) for role in GLM3_ROLE_TOKENS] == [n + 5, n + 6, n + 7, n + 8]
    # Role names in text stay text unless encode_special_tokens is on, as official.
    assert n + 6 not in tok("<|user|>你好")["input_ids"]
    eager = ChatGLM3Tokenizer.from_pretrained(checkpoint_dirs["glm3"], encode_special_tokens=True)
    ids = eager("<|user|>你好", add_special_tokens=False)["input_ids"]
    assert ids == [n + 6] + tok.encode_text("你好")
    # Decoding renders the appended tokens as their names, also when skipping special tokens (they are not
    # registered special tokens in the official tokenizer); the text after one keeps its leading space.
    ids = [tok.get_command("<|user|>")] + tok.encode_text("你好") + [tok.get_command("<|assistant|>")]
    assert tok.decode(ids) == "<|user|> 你好<|assistant|>"
    assert tok.decode(ids, skip_special_tokens=True) == "<|user|> 你好<|assistant|>"


def test_tiny_builds_are_deterministic():
    for mode in ("glm", "glm2"):
        assert build_tokenizer_proto(mode) == build_tokenizer_proto(mode)


# ---------------------------------------------------------------------------------------------- encoding
@pytest.mark.parametrize("mode", MODES)
def test_round_trip_with_whitespace(tokenizers, mode):
    tok = tokenizers[mode]
    ids = tok.encode_text(TEXT)
    assert tok.unk_token_id not in ids  # byte fallback covers emoji and rare characters
    assert tok.decode(ids) == TEXT
    # glm3 keeps [gMASK] sop as text even when skipping special tokens (official), and TEXT then keeps the space
    # sentencepiece's dummy prefix stands for; glm and glm2 decode their specials to nothing.
    with_specials = "[gMASK]sop " + TEXT if mode == "glm3" else TEXT
    assert tok.decode(tok(TEXT)["input_ids"], skip_special_tokens=True) == with_specials
    # Without special tokens, __call__ and encode_text agree.
    assert tok(TEXT, add_special_tokens=False)["input_ids"] == ids


def test_glm_whitespace_pieces(tokenizers):
    tok = tokenizers["glm"]
    pieces = tok.convert_ids_to_tokens(tok.encode_text("a\n    b"))
    assert "<n>" in pieces and "<|blank_4|>" in pieces
    assert pieces.index("<n>") + 1 == pieces.index("<|blank_4|>")
    assert "<|tab|>" in tok.tokenize("a\tb")
    assert tok.decode(tok.encode_text("x" + " " * 85 + "y")) == "x" + " " * 85 + "y"  # longer than <|blank_80|>


@pytest.mark.parametrize("mode", MODES)
def test_special_tokens_placement(tokenizers, mode):
    tok = tokenizers[mode]
    ids = tok("你好")["input_ids"]
    text_ids = tok.encode_text("你好")
    if mode == "glm":
        assert ids == text_ids + gmask_sop(tok)
        assert tok("问", "答")["input_ids"] == tok.encode_text("问") + gmask_sop(tok) + tok.encode_text("答") + [
            tok.eos_token_id]
    else:
        assert ids == gmask_sop(tok) + text_ids
        assert tok("问", "答")["input_ids"] == gmask_sop(tok) + tok.encode_text("问") + tok.encode_text("答") + [
            tok.eos_token_id]
    mask = tok("你好", return_special_tokens_mask=True)["special_tokens_mask"]
    assert mask == [0 if index in text_ids else 1 for index in ids]
    # Truncation keeps the special tokens.
    truncated = tok(TEXT, truncation=True, max_length=6)["input_ids"]
    assert len(truncated) == 6 and set(gmask_sop(tok)) <= set(truncated)


@pytest.mark.parametrize("mode", MODES)
def test_batch_is_left_padded(tokenizers, mode):
    tok = tokenizers[mode]
    assert tok.padding_side == "left"
    batch = tok(["a", "longer text 发动机"], padding=True, return_tensors="pt")
    assert set(batch) == {"input_ids", "attention_mask"}
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.dim() == mask.dim() == 2 and ids.shape == mask.shape
    short = tok("a")["input_ids"]
    pad = ids.shape[1] - len(short)
    assert pad > 0
    assert ids[0].tolist() == [tok.pad_token_id] * pad + short
    assert mask[0].tolist() == [0] * pad + [1] * len(short)
    assert bool(mask[1].all()) and ids[1].tolist() == tok("longer text 发动机")["input_ids"]
    assert ids.dtype == torch.long


@pytest.mark.parametrize("mode", ["glm2", "glm3"])
def test_glm2_decode_drops_bos_eos_pad(tokenizers, mode):
    tok = tokenizers[mode]
    ids = [tok.pad_token_id, tok.get_command("<bos>")] + tok.encode_text("你好") + [tok.eos_token_id]
    assert tok.decode(ids) == "你好"
    if mode == "glm2":  # ChatGLM2 renders its appended tokens as nothing
        assert tok.decode(tok("你好")["input_ids"]) == "你好"


def test_glm_image_tokens_shift_ids(checkpoint_dirs, tokenizers):
    plain = tokenizers["glm"]
    shifted = ChatGLMTokenizer.from_pretrained(checkpoint_dirs["glm"], num_image_tokens=5)
    assert shifted.vocab_size == plain.vocab_size + 5
    assert shifted.encode_text(TEXT) == [index + 5 for index in plain.encode_text(TEXT)]
    assert shifted.gmask_token_id == plain.gmask_token_id + 5 and shifted.pad_token_id == plain.pad_token_id + 5
    assert shifted.convert_tokens_to_ids("<image_2>") == 2 and shifted.convert_ids_to_tokens(2) == "<image_2>"
    # Image tokens decode by name, as the official one-call decode passes the unknown piece through.
    assert shifted.decode([0, 1] + shifted.encode_text("你好")) == "<image_0><image_1> 你好"


# ---------------------------------------------------------------------------------------- saving/loading
@pytest.mark.parametrize("mode", MODES)
def test_save_and_reload(tokenizers, checkpoint_dirs, mode, tmp_path):
    tok = tokenizers[mode]
    tok.save_pretrained(str(tmp_path))
    name = TOKENIZER_FILES[mode]
    assert filecmp.cmp(os.path.join(checkpoint_dirs[mode], name), tmp_path / name, shallow=False)
    with open(tmp_path / "tokenizer_config.json", encoding="utf-8") as handle:
        config = json.load(handle)
    assert config["tokenizer_class"] == type(tok).__name__ and "auto_map" not in config
    again = CLASSES[mode].from_pretrained(str(tmp_path))
    assert again(TEXT)["input_ids"] == tok(TEXT)["input_ids"]
    assert again.encode_text(TEXT) == tok.encode_text(TEXT)
    assert (again.bos_token_id, again.eos_token_id, again.pad_token_id) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    # Saving into the directory it was loaded from leaves the vocabulary file as it is.
    again.save_pretrained(str(tmp_path))
    assert filecmp.cmp(os.path.join(checkpoint_dirs[mode], name), tmp_path / name, shallow=False)


@pytest.mark.parametrize("mode", MODES)
def test_official_tokenizer_config(tokenizers, checkpoint_dirs, mode, tmp_path):
    build_tokenizer_file(mode, str(tmp_path))
    with open(tmp_path / "tokenizer_config.json", "w", encoding="utf-8") as handle:
        json.dump(OFFICIAL_CONFIGS[mode], handle)
    tok = CLASSES[mode].from_pretrained(str(tmp_path))
    reference = tokenizers[mode]
    assert type(tok) is CLASSES[mode] and tok.padding_side == "left"
    assert tok(TEXT)["input_ids"] == reference(TEXT)["input_ids"]
    assert (tok.gmask_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        reference.gmask_token_id, reference.bos_token_id, reference.eos_token_id, reference.pad_token_id)


@pytest.mark.parametrize("mode", MODES)
def test_missing_vocabulary_file_is_a_one_line_error(tmp_path, mode):
    expected = os.path.join(str(tmp_path), TOKENIZER_FILES[mode])
    with pytest.raises(FileNotFoundError) as info:
        CLASSES[mode].from_pretrained(str(tmp_path))
    message = str(info.value)
    assert message.startswith(f"{expected} not found: not a ") and "\n" not in message


def test_wrong_checkpoint_kind_is_refused(checkpoint_dirs):
    with pytest.raises(FileNotFoundError, match="ice_text.model not found"):
        ChatGLMTokenizer.from_pretrained(checkpoint_dirs["glm2"])
    with pytest.raises(FileNotFoundError, match="tokenizer.model not found"):
        ChatGLM2Tokenizer.from_pretrained(checkpoint_dirs["glm"])


def test_corrupt_vocabulary_file(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="is not a sentencepiece model"):
        ChatGLM2Tokenizer.from_pretrained(str(tmp_path))
