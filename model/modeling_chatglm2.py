"""ChatGLM2-6B, ChatGLM3-6B and GLM-4-9B (modes `glm2`, `glm3`, `glm4`): one network.

Pre-norm decoder with RMSNorm, multi-query (grouped) attention whose query_key_value rows are [q heads | k groups |
v groups], rotary embedding on the first half of each head's dimensions with interleaved pairs (2i, 2i+1), SwiGLU MLP
([gate | up] in dense_h_to_4h). Module names are the official checkpoint keys. The versions differ here only in the
dtype of the rotary angles (ChatGLM2's code computes them in the model's dtype, ChatGLM3's and GLM-4's in fp32, the
cos/sin table then rounded to the model's half dtype) and in config values (GLM-4: rotary base 10000 * rope_ratio 500,
RMSNorm eps 1.5625e-7).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .compat import given_cache
from .config import ChatGLM2Config, ChatGLM4Config
from .modeling_base import (BodyMixin, ChatGLMPreTrainedBase, LMHead, PrefixEncoder, attention_allowed,
                            packed_attention_allowed, padding_or_none, sdpa_attention, varlen_available,
                            varlen_sdpa)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (self.weight * (x * torch.rsqrt(variance + self.eps))).to(x.dtype)


def rotary_cos_sin(position_ids, head_dim: int, base: float, angle_dtype, out_dtype):
    """cos, sin [batch, 1, seq, head_dim / 4] for the rotated first half of each head.

    theta_i = base^(-2i / (head_dim/2)); angle = position * theta in `angle_dtype` (as the official code does),
    then cos/sin in fp32, rounded to the model's dtype."""
    n_elem = head_dim // 2
    theta = 1.0 / (base ** (torch.arange(0, n_elem, 2, dtype=angle_dtype, device=position_ids.device) / n_elem))
    angles = (position_ids.to(angle_dtype)[..., None] * theta).float()  # [batch, seq, n_elem / 2]
    return angles.cos().to(out_dtype)[:, None], angles.sin().to(out_dtype)[:, None]


def apply_rotary(x, cos, sin):
    """x [batch, heads, seq, head_dim]: rotate pairs (2i, 2i+1) of the first half; the second half passes."""
    rot_dim = cos.shape[-1] * 2
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    x0, x1 = x_rot.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2)
    return torch.cat([rotated, x_pass], dim=-1)


class SelfAttention(nn.Module):
    # The core attention, in transformers' attention-interface convention (modeling_base.sdpa_attention); sequence
    # parallelism replaces it on each instance with DeepSpeed's Ulysses attention around it (sequence_parallel.py).
    attention_function = staticmethod(sdpa_attention)

    def __init__(self, config: ChatGLM2Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.kv_channels
        self.num_groups = config.multi_query_group_num if config.multi_query_attention else self.num_heads
        qkv_size = (self.num_heads + 2 * self.num_groups) * self.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, qkv_size,
                                         bias=config.add_bias_linear or config.add_qkv_bias)
        self.dense = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, hidden_states, cos, sin, allowed, prefix_kv=None, cache=None, cu_seqlens=None):
        batch, seq, _ = hidden_states.shape
        q, k, v = self.query_key_value(hidden_states).split(
            [self.num_heads * self.head_dim, self.num_groups * self.head_dim, self.num_groups * self.head_dim], -1)
        q = q.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)  # [b, heads, s, d]
        k = k.view(batch, seq, self.num_groups, self.head_dim).transpose(1, 2)  # [b, groups, s, d]
        v = v.view(batch, seq, self.num_groups, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # prefix keys are never rotated
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        elif prefix_kv is not None:
            k, v = torch.cat([prefix_kv[0], k], dim=2), torch.cat([prefix_kv[1], v], dim=2)
        if cu_seqlens is not None:  # packed rows on CUDA: each sequence attends to itself only
            context = varlen_sdpa(q, k, v, cu_seqlens).transpose(1, 2)
        else:
            context, _ = self.attention_function(self, q, k, v, allowed)  # [b, s, heads, d]
        return self.dense(context.reshape(batch, seq, -1))


class MLP(nn.Module):
    def __init__(self, config: ChatGLM2Config):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=config.add_bias_linear)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, x):
        gate, up = self.dense_h_to_4h(x).chunk(2, dim=-1)
        return self.dense_4h_to_h(F.silu(gate) * up)


class GLMBlock(GradientCheckpointingLayer):
    def __init__(self, config: ChatGLM2Config, layer_idx: int):
        super().__init__()
        norm = RMSNorm if config.rmsnorm else lambda size, eps: nn.LayerNorm(size, eps=eps)
        self.post_norm_residual = config.apply_residual_connection_post_layernorm
        self.input_layernorm = norm(config.hidden_size, config.layernorm_epsilon)
        self.self_attention = SelfAttention(config, layer_idx)
        self.post_attention_layernorm = norm(config.hidden_size, config.layernorm_epsilon)
        self.mlp = MLP(config)

    def forward(self, hidden_states, cos, sin, allowed, prefix_kv=None, cache=None, cu_seqlens=None):
        normed = self.input_layernorm(hidden_states)
        attention = self.self_attention(normed, cos, sin, allowed, prefix_kv, cache=cache, cu_seqlens=cu_seqlens)
        hidden_states = (normed if self.post_norm_residual else hidden_states) + attention
        normed = self.post_attention_layernorm(hidden_states)
        return (normed if self.post_norm_residual else hidden_states) + self.mlp(normed)


class GLMTransformer(nn.Module):
    def __init__(self, config: ChatGLM2Config):
        super().__init__()
        self.layers = nn.ModuleList(GLMBlock(config, i) for i in range(config.num_layers))
        if config.post_layer_norm:
            norm = RMSNorm if config.rmsnorm else lambda size, eps: nn.LayerNorm(size, eps=eps)
            self.final_layernorm = norm(config.hidden_size, config.layernorm_epsilon)
        else:
            self.final_layernorm = nn.Identity()


class Embedding(nn.Module):
    def __init__(self, config: ChatGLM2Config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)

    def forward(self, input_ids):
        return self.word_embeddings(input_ids)


class ChatGLM2Model(BodyMixin, nn.Module):
    """The model body (`model.transformer`). Takes the official keyword arguments: input_ids, position_ids,
    attention_mask (2-D, 1 = keep), full_attention_mask (bool [b, 1, q, k], True = masked), cache (a Cache, or the
    official tuples; also accepted as past_key_values), inputs_embeds, use_cache; for packed rows (packing.py, in
    training) position_ids with cu_seqlens. Returns last_hidden_state [batch, seq, hidden] (batch first) after the
    final norm, without the LM head, and the cache."""

    def __init__(self, config: ChatGLM2Config, rotary_fp32: bool):
        super().__init__()
        self.config = config
        self.rotary_fp32 = rotary_fp32
        self.head_dim = config.kv_channels
        self.num_kv_heads = config.multi_query_group_num if config.multi_query_attention else config.num_attention_heads
        self.embedding = Embedding(config)
        self.encoder = GLMTransformer(config)
        self.output_layer = LMHead(config.hidden_size, config.padded_vocab_size, bias=False)
        self.pre_seq_len = config.pre_seq_len or 0
        if self.pre_seq_len:
            kv_size = config.num_layers * 2 * self.num_kv_heads * self.head_dim
            self.prefix_encoder = PrefixEncoder(self.pre_seq_len, kv_size, config.hidden_size,
                                                config.prefix_projection, embed_dim=kv_size)
            self.dropout = nn.Dropout(0.1)  # on the prefix, as in the official code

    def position_ids_for(self, input_ids, attention_mask=None):
        """Positions 0, 1, 2 ... of the real tokens; left padding does not shift them."""
        return self.positions(*input_ids.shape, input_ids.device, attention_mask)

    @staticmethod
    def positions(batch: int, length: int, device, attention_mask=None):
        """[batch, length] positions of a sequence whose 2-D padding mask (if any) is `attention_mask`."""
        if attention_mask is None:
            return torch.arange(length, device=device).expand(batch, -1)
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def forward(self, input_ids=None, position_ids=None, attention_mask=None, full_attention_mask=None,
                cache=None, inputs_embeds=None, use_cache=None, output_hidden_states=None, return_dict=None,
                past_key_values=None, cu_seqlens=None, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.embedding(input_ids)
        batch, seq = inputs_embeds.shape[:2]
        device, dtype = inputs_embeds.device, inputs_embeds.dtype
        cache = given_cache(cache, past_key_values)
        if cu_seqlens is not None:  # packed rows (training, packing.py): each sequence attends to itself only
            if position_ids is None or cache is not None or self.pre_seq_len:
                raise ValueError("packed rows (cu_seqlens) need their position_ids, and take no cache or prefix")
            use_cache = False
        cache, past_len, prefix, use_cache = self.start_cache(cache, use_cache, batch, device, dtype)

        if position_ids is None:
            mask_2d = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
            position_ids = self.positions(batch, past_len + seq, device, mask_2d)[:, -seq:]
        if cu_seqlens is not None:  # CUDA in half precision: varlen attention; else SDPA, a block-diagonal mask
            allowed = None if varlen_available(device, dtype) else packed_attention_allowed(cu_seqlens, batch, seq)
            cu_seqlens = cu_seqlens if allowed is None else None
        elif full_attention_mask is not None:  # official: True = masked
            allowed = self.prefixed_mask(full_attention_mask, self.pre_seq_len + past_len + seq)
        else:
            allowed = attention_allowed(batch, seq, past_len, self.pre_seq_len, padding_or_none(attention_mask),
                                        device=device)
        base = 10000.0 * getattr(self.config, "rope_ratio", 1.0)
        angle_dtype = torch.float32 if self.rotary_fp32 or dtype == torch.float32 else dtype
        cos, sin = rotary_cos_sin(position_ids, self.head_dim, base, angle_dtype, dtype)

        return self.run_layers(self.encoder.layers, self.encoder.final_layernorm, inputs_embeds, (cos, sin, allowed),
                               prefix, cache, use_cache, output_hidden_states, cu_seqlens=cu_seqlens)


class ChatGLM2ForConditionalGeneration(ChatGLMPreTrainedBase):
    """ChatGLM2-6B: `transformer` body (its `output_layer` is the LM head), chat() in the ChatGLM2 format."""

    config_class = ChatGLM2Config
    mode = "glm2"
    rotary_fp32 = False
    supports_packing = True
    _no_split_modules = ["GLMBlock"]
    chat_defaults = {"max_length": 8192, "num_beams": 1, "do_sample": True, "top_p": 0.8, "temperature": 0.8}

    def __init__(self, config: ChatGLM2Config):
        super().__init__(config)
        self.transformer = ChatGLM2Model(config, rotary_fp32=self.rotary_fp32)
        self.post_init()

    @property
    def output_head(self):
        return self.transformer.output_layer

    def get_input_embeddings(self):
        return self.transformer.embedding.word_embeddings

    def set_input_embeddings(self, value):
        self.transformer.embedding.word_embeddings = value


class ChatGLM3ForConditionalGeneration(ChatGLM2ForConditionalGeneration):
    """ChatGLM3-6B: the ChatGLM2 network with fp32 rotary angles; chat() with roles (history is message dicts)."""

    mode = "glm3"
    rotary_fp32 = True


class ChatGLM4ForConditionalGeneration(ChatGLM3ForConditionalGeneration):
    """GLM-4-9B / GLM-4-9B-Chat: the same network and rotary arithmetic as ChatGLM3 (the official GLM-4 code also
    builds the cos/sin table in fp32 and casts it to bf16/fp16 in half precision); its own config, tokenizer
    (tiktoken) and chat template."""

    config_class = ChatGLM4Config
    mode = "glm4"
