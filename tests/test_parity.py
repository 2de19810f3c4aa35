"""Parity with THUDM's official ChatGLMModel: ../shared/reference/*.data hold weights and outputs of the official
code on tiny configs (format in ../shared/reference/README.md). A 3-token prompt, then two decode steps through the
KV cache; our body must reproduce y1, y2, y3."""
import math

import numpy as np
import pytest
import torch

from conftest import shared_path
from model import MODE, modeling_chatglm, modeling_chatglm2
from model.compat import output_cache

GLM_LAYOUT = [  # name, shape (ChatGLM-6B, 1 layer, hidden 32, 8 heads)
    ("word_embeddings.weight", (5, 32)),
    ("layers.0.input_layernorm.weight", (32,)), ("layers.0.input_layernorm.bias", (32,)),
    ("layers.0.attention.query_key_value.weight", (96, 32)), ("layers.0.attention.query_key_value.bias", (96,)),
    ("layers.0.attention.dense.weight", (32, 32)), ("layers.0.attention.dense.bias", (32,)),
    ("layers.0.post_attention_layernorm.weight", (32,)), ("layers.0.post_attention_layernorm.bias", (32,)),
    ("layers.0.mlp.dense_h_to_4h.weight", (128, 32)), ("layers.0.mlp.dense_h_to_4h.bias", (128,)),
    ("layers.0.mlp.dense_4h_to_h.weight", (32, 128)), ("layers.0.mlp.dense_4h_to_h.bias", (32,)),
    ("final_layernorm.weight", (32,)), ("final_layernorm.bias", (32,)),
]
GLM2_LAYOUT = [  # ChatGLM2/3: 1 layer, hidden 32, 8 heads of 4, 2 KV groups, ffn 48
    ("embedding.word_embeddings.weight", (5, 32)),
    ("encoder.layers.0.input_layernorm.weight", (32,)),
    ("encoder.layers.0.self_attention.query_key_value.weight", (48, 32)),
    ("encoder.layers.0.self_attention.query_key_value.bias", (48,)),
    ("encoder.layers.0.self_attention.dense.weight", (32, 32)),
    ("encoder.layers.0.post_attention_layernorm.weight", (32,)),
    ("encoder.layers.0.mlp.dense_h_to_4h.weight", (96, 32)),
    ("encoder.layers.0.mlp.dense_4h_to_h.weight", (32, 48)),
    ("encoder.final_layernorm.weight", (32,)),
]
TAIL = [("x1", (1, 3), np.int32), ("y1", (3, 1, 32), np.float32), ("x2", (1, 1), np.int32),
        ("y2", (1, 1, 32), np.float32), ("x3", (1, 1), np.int32), ("y3", (1, 1, 32), np.float32)]


def read_reference(name, layout, prefix_shape=None):
    raw = shared_path("reference", f"{name}.data").read_bytes()
    offset, tensors = 0, {}

    def take(shape, dtype):
        nonlocal offset
        count = int(np.prod(shape))
        array = np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(shape)
        offset += count * np.dtype(dtype).itemsize
        return torch.from_numpy(array.copy())

    if prefix_shape:
        cache = take(prefix_shape, np.float16).float()  # [2L, heads, pre, dim]
        tensors["prefix_encoder.embedding.weight"] = cache.permute(2, 0, 1, 3).reshape(prefix_shape[2], -1)
    for key, shape in layout:
        tensors[key] = take(shape, np.float32)
    tail = {key: take(shape, dtype) for key, shape, dtype in TAIL}
    assert offset == len(raw), "reference layout does not cover the whole file"
    return tensors, tail


def build_body(mode, weights, **config_overrides):
    spec = MODE[mode]
    if mode == "glm":
        config = spec.config(vocab_size=5, hidden_size=32, num_attention_heads=8, num_layers=1,
                             inner_hidden_size=128, **config_overrides)
    else:
        config = spec.config(padded_vocab_size=5, hidden_size=32, num_attention_heads=8, kv_channels=4,
                             multi_query_attention=True, multi_query_group_num=2, ffn_hidden_size=48, num_layers=1,
                             **config_overrides)
    model = spec.model(config).eval()
    body = model.transformer
    result = body.load_state_dict(weights, strict=False)
    # Everything the official body has must be loaded; only our LM head (not in the file) stays out.
    assert result.unexpected_keys == []
    assert set(result.missing_keys) <= {"output_layer.weight"}
    return body


def run_three_steps(mode, body, tail):
    torch.manual_seed(0)
    with torch.no_grad():
        if mode == "glm":
            out = body(input_ids=tail["x1"].long(), position_ids=torch.tensor([[[0, 1, 1], [0, 0, 1]]]),
                       attention_mask=torch.tensor([[[[0, 0, 1], [0, 0, 1], [0, 0, 0]]]]).bool(), use_cache=True)
            y1 = out.last_hidden_state
            out = body(input_ids=tail["x2"].long(), position_ids=torch.tensor([[[1], [2]]]),
                       cache=output_cache(out), use_cache=True)
            y2 = out.last_hidden_state
            out = body(input_ids=tail["x3"].long(), position_ids=torch.tensor([[[1], [3]]]),
                       cache=output_cache(out), use_cache=True)
        else:
            out = body(input_ids=tail["x1"].long(), position_ids=torch.tensor([[0, 1, 2]]),
                       attention_mask=torch.ones(1, 3, dtype=torch.long), use_cache=True)
            y1 = out.last_hidden_state
            out = body(input_ids=tail["x2"].long(), position_ids=torch.tensor([[3]]),
                       attention_mask=torch.ones(1, 4, dtype=torch.long), cache=output_cache(out),
                       use_cache=True)
            y2 = out.last_hidden_state
            out = body(input_ids=tail["x3"].long(), position_ids=torch.tensor([[4]]),
                       attention_mask=torch.ones(1, 5, dtype=torch.long), cache=output_cache(out),
                       use_cache=True)
        y3 = out.last_hidden_state
    # Ours is batch-first [1, seq, 32], the reference seq-first [seq, 1, 32]: identical for batch 1.
    return [y.transpose(0, 1) for y in (y1, y2, y3)]


CASES = [
    ("glm_model", "glm", GLM_LAYOUT, None, {}, 1e-4),
    ("glm2_model", "glm2", GLM2_LAYOUT, None, {}, 1e-4),
    ("glm2_model", "glm3", GLM2_LAYOUT, None, {}, 1e-4),  # ChatGLM3's body is ChatGLM2's
    ("glm_ptuning_v2_model", "glm", GLM_LAYOUT, (2, 8, 5, 4), {"pre_seq_len": 5}, 5e-4),
    ("glm3_ptuning_v2_model", "glm3", GLM2_LAYOUT, (2, 2, 5, 4), {"pre_seq_len": 5}, 5e-4),
    # GLM-4 with its own config defaults (eps 1.5625e-7, rope_ratio 500). The bound is tighter than the README's 1e-4
    # because ChatGLM2's eps 1e-5 would still pass 1e-4 here (4.1e-5). fp32 rounding of a forward on another CPU
    # (sums of 32 to 96 products, outputs of order 1) reaches about sqrt(96) * 1.2e-7 = 1.2e-6, so 1e-6 could fail
    # on a machine that sums in another order; 1e-5 holds there and still tells the two eps apart (4x either side).
    ("glm4_model", "glm4", GLM2_LAYOUT, None, {}, 1e-5),
    # GLM-4's P-Tuning v2 prefix has ChatGLM3's layout; the file is ChatGLM3's, so its eps.
    ("glm3_ptuning_v2_model", "glm4", GLM2_LAYOUT, (2, 2, 5, 4), {"pre_seq_len": 5, "layernorm_epsilon": 1e-5}, 5e-4),
]


@pytest.mark.parametrize("name,mode,layout,prefix_shape,overrides,tolerance", CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_official_reference(name, mode, layout, prefix_shape, overrides, tolerance):
    weights, tail = read_reference(name, layout, prefix_shape)
    body = build_body(mode, weights, **overrides)
    for ours, expected in zip(run_three_steps(mode, body, tail), (tail["y1"], tail["y2"], tail["y3"])):
        assert ours.shape == expected.shape
        error = (ours - expected).abs().max().item()
        assert error < tolerance, f"{name} ({mode}): max abs error {error:.2e}"


def test_reference_rejects_wrong_network():
    """The check has teeth: the ChatGLM2 weights run through a standard (non-causal-masked) attention must fail."""
    weights, tail = read_reference("glm2_model", GLM2_LAYOUT)
    body = build_body("glm2", weights)
    with torch.no_grad():
        out = body(input_ids=tail["x1"].long(), position_ids=torch.tensor([[0, 1, 2]]),
                   full_attention_mask=torch.zeros(1, 1, 3, 3, dtype=torch.bool), use_cache=False)
    assert (out.last_hidden_state.transpose(0, 1) - tail["y1"]).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------------ the checks have teeth
def max_reference_error(name, mode, layout):
    weights, tail = read_reference(name, layout)
    body = build_body(mode, weights)
    return max((ours - expected).abs().max().item()
               for ours, expected in zip(run_three_steps(mode, body, tail), (tail["y1"], tail["y2"], tail["y3"])))


def test_reference_rejects_a_wrong_residual_scale(monkeypatch):
    """sqrt(2 * 27) instead of sqrt(2 * 28) (an off-by-one layer count) must fail the ChatGLM-6B reference."""
    monkeypatch.setattr(modeling_chatglm, "RESIDUAL_ALPHA", math.sqrt(2 * 27))
    assert max_reference_error("glm_model", "glm", GLM_LAYOUT) > 1e-3


def glm2_rotary_base_10001(monkeypatch):
    original = modeling_chatglm2.rotary_cos_sin
    monkeypatch.setattr(modeling_chatglm2, "rotary_cos_sin",
                        lambda positions, head_dim, base, angle_dtype, out_dtype:
                        original(positions, head_dim, base * 1.0001, angle_dtype, out_dtype))


def tiny_logits(directory, mode):
    from model import template

    model = MODE[mode].model.from_pretrained(str(directory)).eval()
    tokenizer = MODE[mode].tokenizer.from_pretrained(str(directory))
    ids = template.encode_prompt(tokenizer, mode, "发动机水温高，风扇低速转动。What should I check first? " * 3,
                                 [("你好", "你好！")])
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


@pytest.mark.parametrize("mode", ["glm", "glm2", "glm3"])
def test_tiny_checkpoints_show_a_wrong_constant(mode, tiny_dirs, monkeypatch, one_thread):
    """The tiny checkpoints that the train/merge/predict tests compare logits on are strong enough that a wrong
    residual scale (ChatGLM-6B) or a rotary base of 10001 (ChatGLM2/3) moves their logits by more than 1e-3.
    (ChatGLM-6B rounds its inv_freq to fp16, which absorbs a base of 10001: the official code cannot tell either.)"""
    expected = tiny_logits(tiny_dirs[mode], mode)
    if mode == "glm":
        monkeypatch.setattr(modeling_chatglm, "RESIDUAL_ALPHA", math.sqrt(2 * 27))
    else:
        glm2_rotary_base_10001(monkeypatch)
    assert (tiny_logits(tiny_dirs[mode], mode) - expected).abs().max().item() > 1e-3
