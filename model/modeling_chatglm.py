"""ChatGLM-6B (mode `glm`).

GLM blocks with LayerNorm, a residual that adds the *normalised* input times alpha = sqrt(2 * 28), attention whose
query_key_value rows interleave per head [q_h | k_h | v_h], 2-D rotary embedding (the first half of each head's
dimensions rotates by the position, the second half by the block position, pairs (i, i + n/2) within each half),
tanh-GeLU MLP. Over the context up to <sop> attention is bidirectional, after it causal. Module names are the official
checkpoint keys.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .compat import given_cache
from .config import ChatGLMConfig
from .modeling_base import (BodyMixin, ChatGLMPreTrainedBase, LMHead, PrefixEncoder, attention_allowed,
                            padding_or_none, sdpa)

# The official GLMBlock is built without num_layers and falls back to its default of 28, so the residual scale is
# sqrt(2 * 28) whatever the config says (confirmed by the reference tensors of a 1-layer model).
RESIDUAL_ALPHA = math.sqrt(2 * 28)


def rotary_cos_sin(position_ids, half_dim: int, dtype):
    """cos, sin [batch, 1, seq, half_dim] for one half of a head. As in the official code, inv_freq is rounded to
    fp16 and the angles and their cos/sin are computed in the model's dtype."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, half_dim, 2, device=position_ids.device).float() / half_dim))
    inv_freq = inv_freq.half().to(dtype)
    freqs = position_ids.to(dtype)[..., None] * inv_freq  # [batch, seq, half_dim / 2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos()[:, None], emb.sin()[:, None]


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary_2d(x, rope):
    """x [batch, heads, seq, head_dim]: first half rotated by positions, second half by block positions."""
    (cos1, sin1), (cos2, sin2) = rope
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos1 + rotate_half(x1) * sin1, x2 * cos2 + rotate_half(x2) * sin2], dim=-1)


class SelfAttention(nn.Module):
    def __init__(self, config: ChatGLMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states, rope, allowed, prefix_kv=None, cache=None):
        batch, seq, _ = hidden_states.shape
        qkv = self.query_key_value(hidden_states).view(batch, seq, self.num_heads, 3 * self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.split(self.head_dim, dim=-1))  # [b, heads, s, d]
        q, k = apply_rotary_2d(q, rope), apply_rotary_2d(k, rope)  # prefix keys are never rotated
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        elif prefix_kv is not None:
            k, v = torch.cat([prefix_kv[0], k], dim=2), torch.cat([prefix_kv[1], v], dim=2)
        context = sdpa(q, k, v, allowed)
        return self.dense(context.transpose(1, 2).reshape(batch, seq, -1))


class GLU(nn.Module):
    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        inner = config.inner_hidden_size or 4 * config.hidden_size
        self.dense_h_to_4h = nn.Linear(config.hidden_size, inner)
        self.dense_4h_to_h = nn.Linear(inner, config.hidden_size)

    def forward(self, x):
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh"))


class GLMBlock(GradientCheckpointingLayer):
    def __init__(self, config: ChatGLMConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = SelfAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = GLU(config)

    def forward(self, hidden_states, rope, allowed, prefix_kv=None, cache=None):
        normed = self.input_layernorm(hidden_states)
        hidden_states = normed * RESIDUAL_ALPHA + self.attention(normed, rope, allowed, prefix_kv,
                                                                 cache=cache)
        normed = self.post_attention_layernorm(hidden_states)
        return normed * RESIDUAL_ALPHA + self.mlp(normed)


class ChatGLMModel(BodyMixin, nn.Module):
    """The model body (`model.transformer`). Takes the official keyword arguments: input_ids, position_ids
    ([batch, 2, seq]: positions, block positions), attention_mask (bool [batch, 1, seq, seq] with True = masked, or a
    2-D padding mask with 1 = keep), cache (a Cache, or the official tuples; also accepted as past_key_values),
    inputs_embeds, use_cache. Masks and positions not given are derived from input_ids as the official code does.
    Returns last_hidden_state [batch, seq, hidden] (batch first) after the final LayerNorm, and the cache."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        if not config.position_encoding_2d:
            raise ValueError("config.json: position_encoding_2d false is not a ChatGLM-6B network")
        self.config = config
        self.num_kv_heads = config.num_attention_heads  # no grouped heads in ChatGLM-6B
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GLMBlock(config, i) for i in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.pre_seq_len = config.pre_seq_len or 0
        if self.pre_seq_len:
            kv_size = config.num_layers * 2 * config.hidden_size
            self.prefix_encoder = PrefixEncoder(self.pre_seq_len, kv_size, config.hidden_size,
                                                config.prefix_projection, embed_dim=config.hidden_size)
            self.dropout = nn.Dropout(0.1)  # on the prefix, as in the official code

    def context_lengths(self, input_ids):
        """Index of the first <sop> in each row (the bidirectional context before it); the row length if none."""
        is_bos = input_ids == self.config.bos_token_id
        first = is_bos.int().argmax(-1)
        return torch.where(is_bos.any(-1), first, torch.full_like(first, input_ids.shape[1]))

    def position_ids_for(self, input_ids, attention_mask=None):
        """[batch, 2, seq] as the official tokenizer builds them: positions count up over the context and then stay
        at the [gMASK] (or [MASK]) position; block positions are 0 over the context and 1, 2, ... after it. Left
        padding does not shift them (pads get 0, 0)."""
        batch, seq = input_ids.shape
        index = torch.arange(seq, device=input_ids.device).expand(batch, -1)
        pads = (seq - attention_mask.long().sum(-1)) if attention_mask is not None else torch.zeros_like(index[:, 0])
        context = self.context_lengths(input_ids)
        is_gmask = input_ids == self.config.gmask_token_id
        is_mask = input_ids == self.config.mask_token_id
        use = torch.where(is_gmask.any(-1, keepdim=True), is_gmask, is_mask)
        mask_position = torch.where(use.any(-1), use.int().argmax(-1), context - 1)
        in_context = index < context[:, None]
        positions = torch.where(in_context, index, mask_position[:, None]) - pads[:, None]
        block = torch.where(in_context, 0, index - context[:, None] + 1)
        is_pad = index < pads[:, None]
        return torch.stack([positions.masked_fill(is_pad, 0), block.masked_fill(is_pad, 0)], dim=1)

    def forward(self, input_ids=None, position_ids=None, attention_mask=None, cache=None, inputs_embeds=None,
                use_cache=None, output_hidden_states=None, return_dict=None, past_key_values=None, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        batch, seq = inputs_embeds.shape[:2]
        device, dtype = inputs_embeds.device, inputs_embeds.dtype
        cache = given_cache(cache, past_key_values)
        cache, past_len, prefix, use_cache = self.start_cache(cache, use_cache, batch, device, dtype)

        mask_2d = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        if position_ids is None:
            if past_len or input_ids is None:
                raise ValueError("ChatGLM-6B needs position_ids for decode steps and embeddings input "
                                 "(generate() computes them)")
            position_ids = self.position_ids_for(input_ids, mask_2d)
        if attention_mask is not None and attention_mask.dim() == 4:  # official: True = masked
            allowed = self.prefixed_mask(attention_mask, self.pre_seq_len + past_len + seq)
        else:
            context = self.context_lengths(input_ids) if past_len == 0 and input_ids is not None else None
            allowed = attention_allowed(batch, seq, past_len, self.pre_seq_len, padding_or_none(mask_2d),
                                        context_lengths=context, device=device)
        half_dim = self.head_dim // 2
        rope = (rotary_cos_sin(position_ids[:, 0], half_dim, dtype), rotary_cos_sin(position_ids[:, 1], half_dim, dtype))

        return self.run_layers(self.layers, self.final_layernorm, inputs_embeds, (rope, allowed), prefix, cache,
                               use_cache, output_hidden_states)


class ChatGLMForConditionalGeneration(ChatGLMPreTrainedBase):
    """ChatGLM-6B: `transformer` body and `lm_head`, chat() in the ChatGLM-6B format."""

    config_class = ChatGLMConfig
    mode = "glm"
    _no_split_modules = ["GLMBlock"]
    # One matrix for the input embedding and the LM head while config.tie_word_embeddings (True unless config.json
    # says false, see ChatGLMConfig): transformers ties them in post_init() and from_pretrained(), fills either key
    # from the other when a checkpoint stores only one, and save_pretrained() writes the source key only.
    _tied_weights_keys = {"lm_head.weight": "transformer.word_embeddings.weight"}
    chat_defaults = {"max_length": 2048, "num_beams": 1, "do_sample": True, "top_p": 0.7, "temperature": 0.95}

    def __init__(self, config: ChatGLMConfig):
        super().__init__(config)
        self.transformer = ChatGLMModel(config)
        self.lm_head = LMHead(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @property
    def output_head(self):
        return self.lm_head

    def get_input_embeddings(self):
        return self.transformer.word_embeddings

    def set_input_embeddings(self, value):
        self.transformer.word_embeddings = value
