"""Second oracles at realistic head sizes, where rotary pairing and base show (the reference tensors use head_dim 4).

ChatGLM2/3: transformers' own GlmForCausalLM is an independent implementation of the same network; with its weights
renamed to the official names our model must give the same logits. ChatGLM-6B has no such twin: its 2-D rotary at
full head size is checked against a direct transcription of the official formulas (rotate_half pairs (i, i + n/2)
within each half, inv_freq = 10000^(-2i/n) rounded to fp16, halves rotated by position and block position)."""
import math

import pytest
import torch
from transformers import GlmConfig, GlmForCausalLM

from model import MODE


def glm_oracle_pair(mode, rope_ratio=1.0, eps=1e-5):
    torch.manual_seed(0)
    hidden, heads, groups, head_dim, ffn, layers, vocab = 256, 2, 1, 128, 192, 2, 300
    oracle = GlmForCausalLM(GlmConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                                      num_hidden_layers=layers, num_attention_heads=heads,
                                      num_key_value_heads=groups, head_dim=head_dim, attention_bias=True,
                                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0 * rope_ratio,
                                                       "partial_rotary_factor": 0.5},
                                      rms_norm_eps=eps, max_position_embeddings=4096, pad_token_id=0)).eval()
    # Large enough that every weight matters (norm weights included) and that a rotary base of 10001 instead of
    # 10000 moves the logits by more than 1e-3 (test_oracle_rejects_rotary_base_10001); at +-0.1 it moved them 7e-5.
    for p in oracle.parameters():
        torch.nn.init.uniform_(p, -0.3, 0.3) if p.dim() > 1 else torch.nn.init.uniform_(p, 0.5, 1.5)
    # glm4 keeps its own defaults (rope_ratio 500, eps 1.5625e-7): the oracle is given them, not the other way round.
    sizes = dict(padded_vocab_size=vocab, hidden_size=hidden, num_attention_heads=heads, kv_channels=head_dim,
                 multi_query_attention=True, multi_query_group_num=groups, ffn_hidden_size=ffn, num_layers=layers)
    config = MODE[mode].config(**sizes) if mode == "glm4" else MODE[mode].config(**sizes, layernorm_epsilon=eps)
    ours = MODE[mode].model(config).eval()
    src = oracle.state_dict()
    renamed = {"transformer.embedding.word_embeddings.weight": src["model.embed_tokens.weight"],
               "transformer.encoder.final_layernorm.weight": src["model.norm.weight"],
               "transformer.output_layer.weight": src["lm_head.weight"]}
    for i in range(layers):
        a, b = f"model.layers.{i}.", f"transformer.encoder.layers.{i}."
        for part in ("weight", "bias"):
            renamed[f"{b}self_attention.query_key_value.{part}"] = torch.cat(
                [src[f"{a}self_attn.{n}_proj.{part}"] for n in "qkv"])
        renamed[f"{b}self_attention.dense.weight"] = src[f"{a}self_attn.o_proj.weight"]
        renamed[f"{b}mlp.dense_h_to_4h.weight"] = src[f"{a}mlp.gate_up_proj.weight"]
        renamed[f"{b}mlp.dense_4h_to_h.weight"] = src[f"{a}mlp.down_proj.weight"]
        renamed[f"{b}input_layernorm.weight"] = src[f"{a}input_layernorm.weight"]
        renamed[f"{b}post_attention_layernorm.weight"] = src[f"{a}post_attention_layernorm.weight"]
    ours.load_state_dict(renamed, strict=True)
    return oracle, ours


def oracle_and_ours_logits(mode):
    oracle, ours = glm_oracle_pair(mode)
    ids = torch.randint(1, 300, (2, 40))
    positions = torch.arange(1000, 1040).expand(2, -1)  # far positions: a wrong base or pairing shows at once
    with torch.no_grad():
        expected = oracle(input_ids=ids, position_ids=positions).logits
        got = ours(input_ids=ids, position_ids=positions).logits
    return ours, ids, positions, expected, got


def oracle_tolerance(expected):
    return 1e-4 * expected.abs().max().item()


@pytest.mark.parametrize("mode", ["glm2", "glm3"])
def test_matches_transformers_glm(mode):
    ours, ids, positions, expected, got = oracle_and_ours_logits(mode)
    assert (got - expected).abs().max().item() < oracle_tolerance(expected)
    # the comparison can fail: other relative distances (rotary is relative, so scale rather than shift) differ
    with torch.no_grad():
        stretched = ours(input_ids=ids, position_ids=positions * 2).logits
    assert (stretched - expected).abs().max().item() > 1e-3


@pytest.mark.parametrize("mode", ["glm2", "glm3"])
def test_oracle_rejects_rotary_base_10001(mode, monkeypatch):
    from model import modeling_chatglm2

    original = modeling_chatglm2.rotary_cos_sin
    monkeypatch.setattr(modeling_chatglm2, "rotary_cos_sin",
                        lambda positions, head_dim, base, angle_dtype, out_dtype:
                        original(positions, head_dim, base * 1.0001, angle_dtype, out_dtype))
    _, _, _, expected, got = oracle_and_ours_logits(mode)
    error = (got - expected).abs().max().item()
    assert error > 1e-3 and error > oracle_tolerance(expected)


def test_glm4_matches_transformers_glm_left_padded_at_far_positions():
    """GLM-4 (rope base 10000 * 500, eps 1.5625e-7) against GlmForCausalLM with the official GLM-4 values, on a
    left-padded batch long enough that real positions pass 1000: our model derives the positions from the padding
    mask; the oracle is given the same positions explicitly."""
    oracle, ours = glm_oracle_pair("glm4", rope_ratio=500, eps=1.5625e-7)
    assert (ours.config.rope_ratio, ours.config.layernorm_epsilon) == (500, 1.5625e-7)
    torch.manual_seed(1)
    ids = torch.randint(1, 300, (2, 1040))
    mask = torch.ones_like(ids)
    mask[1, :24] = 0  # row 1: 24 pads on the left
    ids[1, :24] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = oracle(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        got = ours(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    scale = expected[real].abs().max().item()
    assert (got[real] - expected[real]).abs().max().item() < 1e-4 * scale
    # the pads change nothing: row 1 alone, unpadded, gives the same logits
    with torch.no_grad():
        alone = ours(input_ids=ids[1:, 24:]).logits
    assert (alone[0] - got[1, 24:]).abs().max().item() < 1e-4 * scale
    # teeth: ChatGLM3's rotary base (rope_ratio 1) gives other logits at these positions
    ours.config.rope_ratio = 1.0
    with torch.no_grad():
        base_10000 = ours(input_ids=ids, attention_mask=mask).logits
    assert (base_10000[real] - expected[real]).abs().max().item() > 1e-2 * scale


def test_glm4_rotary_table_in_half_precision():
    """As the official GLM-4 code: angles and cos/sin in fp32 (base 10000 * 500), then rounded to bf16/fp16."""
    from model.modeling_chatglm2 import rotary_cos_sin

    head_dim, base = 128, 10000.0 * 500
    positions = torch.arange(1000, 1300)[None]
    n_elem = head_dim // 2
    theta = 1.0 / (base ** (torch.arange(0, n_elem, 2, dtype=torch.float) / n_elem))
    angles = torch.outer(torch.arange(1300, dtype=torch.float), theta).float()[1000:]
    for dtype in (torch.bfloat16, torch.float16):
        cos, sin = rotary_cos_sin(positions, head_dim, base, torch.float32, dtype)
        assert cos.dtype == dtype
        assert torch.equal(cos[0, 0], angles.cos().to(dtype)) and torch.equal(sin[0, 0], angles.sin().to(dtype))
    # the model path picks fp32 angles for glm4 in half precision
    config = MODE["glm4"].config(padded_vocab_size=64, hidden_size=64, num_attention_heads=4, kv_channels=16,
                                 ffn_hidden_size=32, num_layers=1)
    assert MODE["glm4"].model(config).transformer.rotary_fp32


def official_glm_attention_scores(q, k, positions, block_positions):
    """Direct transcription of the official ChatGLM-6B rotary, seq-first as there: q, k [seq, heads, head_dim]."""
    half = q.shape[-1] // 2
    inv_freq = (1.0 / (10000 ** (torch.arange(0, half, 2).float() / half))).half().float()

    def rotate(x, pos):
        freqs = torch.einsum("i,j->ij", pos.float(), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    def rope(x):
        a, b = x.chunk(2, dim=-1)
        return torch.cat([rotate(a, positions), rotate(b, block_positions)], dim=-1)

    q, k = rope(q), rope(k)
    return torch.einsum("shd,thd->hst", q, k) / math.sqrt(q.shape[-1])


def glm_2d_rotary_error():
    from model.modeling_chatglm import apply_rotary_2d, rotary_cos_sin

    torch.manual_seed(0)
    seq, heads, head_dim = 50, 2, 128
    q, k = torch.randn(seq, heads, head_dim), torch.randn(seq, heads, head_dim)
    positions = torch.cat([torch.arange(30), torch.full((20,), 29)]) + 900
    block = torch.cat([torch.zeros(30, dtype=torch.long), torch.arange(1, 21)])
    expected = official_glm_attention_scores(q, k, positions, block)
    pos_ids = torch.stack([positions, block])[None]  # [1, 2, seq]
    rope = (rotary_cos_sin(pos_ids[:, 0], head_dim // 2, torch.float32),
            rotary_cos_sin(pos_ids[:, 1], head_dim // 2, torch.float32))
    q_ours = apply_rotary_2d(q.permute(1, 0, 2)[None], rope)[0]  # [heads, seq, dim]
    k_ours = apply_rotary_2d(k.permute(1, 0, 2)[None], rope)[0]
    got = q_ours @ k_ours.transpose(-1, -2) / math.sqrt(head_dim)
    return (got - expected).abs().max().item()


def test_glm_2d_rotary_at_full_head_size():
    assert glm_2d_rotary_error() < 1e-4

