"""What the two ChatGLM networks share: loading with strict key checks, the LM head with a memory-light loss,
the P-Tuning v2 prefix encoder, attention masks for SDPA, and chat() / stream_chat() on top of generate()."""
from __future__ import annotations

import logging
import os
import threading
from queue import Queue

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation.streamers import BaseStreamer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from . import template
from .compat import CACHE_NAME, given_cache, output_cache
from .config import VERSION_KEY, check_checkpoint_dir
from .template import IGNORE_INDEX

logger = logging.getLogger("chatglm")


def check_safetensors_headers(directory: str) -> None:
    """Open the header of every *.safetensors file in `directory` (cheap: no tensor is read), so that a truncated or
    foreign file is named in one line instead of failing deep inside loading with safetensors' own message."""
    from safetensors import SafetensorError, safe_open

    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            try:
                with safe_open(os.path.join(directory, name), framework="pt"):
                    pass
            except (SafetensorError, OSError) as error:
                raise ValueError(f"{os.path.join(directory, name)}: not a readable safetensors file ({error})") \
                    from None


# ----------------------------------------------------------------------------------------------------------------
# Loss: cross-entropy over the labelled positions only, in chunks, never holding fp32 logits for the whole batch.
# ----------------------------------------------------------------------------------------------------------------
class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, target_i), computed chunk by chunk; the backward recomputes each chunk's logits
    instead of keeping them, so memory is one chunk of [rows, vocab] fp32 logits, not [tokens, vocab]."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        log_normalisers = []
        for start in range(0, hidden.shape[0], chunk_rows):
            logits = (hidden[start:start + chunk_rows] @ weight.t()).float()  # [rows, vocab]
            lse = torch.logsumexp(logits, dim=-1)
            target_logits = logits.gather(1, targets[start:start + chunk_rows, None]).squeeze(1)
            total += (lse - target_logits).sum()
            log_normalisers.append(lse)
        lse_all = torch.cat(log_normalisers) if log_normalisers else hidden.new_zeros(0, dtype=torch.float32)
        ctx.save_for_backward(hidden, weight, targets, lse_all)
        ctx.chunk_rows = chunk_rows
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, targets, lse_all = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        for start in range(0, hidden.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            chunk = hidden[rows]
            probs = torch.exp((chunk @ weight.t()).float() - lse_all[rows, None])  # softmax
            probs[torch.arange(probs.shape[0], device=probs.device), targets[rows]] -= 1.0
            grad_logits = (probs * grad_total).to(hidden.dtype)
            if need_hidden:
                grad_hidden[rows] = grad_logits @ weight
            if need_weight:
                grad_weight += (grad_logits.t() @ chunk).float()
        return grad_hidden, grad_weight.to(weight.dtype) if need_weight else None, None, None


class LMHead(nn.Linear):
    """The output projection. Called with `targets`, it returns the summed cross-entropy over those rows without
    materialising their logits all at once (the loss is computed inside this module's forward so that ZeRO-3
    gathers the weight for it, as for any Linear)."""

    def forward(self, hidden_states, targets=None):
        if targets is None:
            return super().forward(hidden_states)
        # Rows of at most ~64 MiB of fp32 logits each.
        chunk_rows = max(1, (1 << 24) // self.out_features)
        return _ChunkedLinearCrossEntropy.apply(hidden_states, self.weight, targets, chunk_rows)


def labelled_loss(head: LMHead, hidden_states, labels=None, reduction: str = "mean", shift_labels=None):
    """Causal-LM loss: position t predicts labels[t + 1]; only labels != -100 count.

    `shift_labels` (transformers' name) are targets already aligned with the positions: shift_labels[t] is what
    position t predicts. Sequence parallelism needs them: it shifts the labels of the whole sequence before cutting
    it into shards (the last position of one shard predicts the first token of the next), so no shard can shift its
    own. Given `labels`, they are shifted here.

    The labelled positions are found where the labels live: train.py leaves them on the host, so finding them costs
    the accelerator no sync, and only those rows of the hidden states reach the LM head (prompt tokens cost no
    logits). The two index tensors go to a CUDA device from pinned memory: CUDA performs a stream sync before any
    copy from pageable host memory, which here would make the host wait for the whole forward before it could queue
    the loss and the backward.

    reduction "mean" (over the labelled tokens) or "sum" (train.py divides by the token count of the whole
    accumulation window, so every labelled token weighs the same)."""
    if shift_labels is None:
        shift_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    batch, seq = shift_labels.shape
    targets = shift_labels.reshape(-1)
    rows = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # flat index over [batch, seq]
    targets = targets[rows]
    device = hidden_states.device
    if device.type == "cuda" and shift_labels.device.type == "cpu":
        rows, targets = rows.pin_memory(), targets.pin_memory()
    hidden = hidden_states.reshape(batch * seq, -1).index_select(0, rows.to(device, non_blocking=True))
    loss = head(hidden, targets=targets.to(device, non_blocking=True))
    if reduction == "sum":
        return loss
    return loss / max(rows.numel(), 1)


# ----------------------------------------------------------------------------------------------------------------
# P-Tuning v2
# ----------------------------------------------------------------------------------------------------------------
class Float32Linear(nn.Linear):
    """A Linear that computes in fp32 whatever the dtype its weights were cast to."""

    def forward(self, x):
        bias = self.bias.float() if self.bias is not None else None
        return F.linear(x.float(), self.weight.float(), bias)


class PrefixEncoder(nn.Module):
    """Learned key/value prefix for every layer: [batch, pre_seq_len] -> [batch, pre_seq_len, 2 * layers * kv_dim].

    With `prefix_projection` an embedding of size `embed_dim` goes through Linear-Tanh-Linear (ChatGLM-6B embeds in
    hidden_size, ChatGLM2/3 in the full kv size). The encoder's own arithmetic (the lookup and the MLP) runs in fp32
    whatever the model's dtype, and returns fp32; `get_prompt` then casts the keys and values to the model's dtype,
    because attention runs in that dtype. Under fp16 the prefix is therefore finite only while its values stay
    inside fp16's range (|x| < 65504); tests/test_train.py checks that fp16 P-Tuning loss and gradients stay finite
    and match fp32 with prefix values in the thousands, far beyond what trained prefixes reach. Submodules are called
    through their forward so that ZeRO-3 gathers their weights."""

    def __init__(self, pre_seq_len: int, kv_size: int, hidden_size: int, projection: bool, embed_dim: int):
        super().__init__()
        self.prefix_projection = projection
        if projection:
            self.embedding = nn.Embedding(pre_seq_len, embed_dim)
            self.trans = nn.Sequential(Float32Linear(embed_dim, hidden_size), nn.Tanh(),
                                       Float32Linear(hidden_size, kv_size))
        else:
            self.embedding = nn.Embedding(pre_seq_len, kv_size)

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=prefix.device.type, enabled=False):
            out = self.embedding(prefix).float()
            if self.prefix_projection:
                out = self.trans(out)
        return out


# ----------------------------------------------------------------------------------------------------------------
# Attention masks (True = may attend, as SDPA wants)
# ----------------------------------------------------------------------------------------------------------------
def unmask_empty_rows(allowed: torch.Tensor) -> torch.Tensor:
    """Rows of padding queries see nothing; let them see everything so softmax stays finite (their output is never
    used, and the official code gives them a uniform distribution the same way)."""
    return allowed | ~allowed.any(dim=-1, keepdim=True)


def attention_allowed(batch: int, q_len: int, past_len: int, prefix_len: int, padding_mask, context_lengths=None,
                      device=None):
    """Which keys each new query may see, as bool [batch, 1, q_len, prefix_len + past_len + q_len] (True = attend),
    or None where plain SDPA causal (or, for one new token, no mask) is exact.

    past_len counts cached tokens (not the prefix); padding_mask [batch, past_len + q_len] is 1 for real tokens;
    context_lengths (ChatGLM-6B) are the lengths of the bidirectional context that every token sees."""
    if padding_mask is None and context_lengths is None and prefix_len == 0 and (past_len == 0 or q_len == 1):
        return None
    q_index = torch.arange(past_len, past_len + q_len, device=device)
    k_index = torch.arange(past_len + q_len, device=device)
    allowed = (k_index[None, :] <= q_index[:, None]).expand(batch, q_len, past_len + q_len)
    if context_lengths is not None:
        allowed = allowed | (k_index[None, None, :] < context_lengths[:, None, None])
    if padding_mask is not None:
        allowed = allowed & padding_mask[:, None, :].bool()
    allowed = unmask_empty_rows(allowed)
    if prefix_len:  # the P-Tuning prefix is visible to every token
        allowed = torch.cat([allowed.new_ones(batch, q_len, prefix_len), allowed], dim=-1)
    return allowed[:, None]


def sdpa(query, key, value, allowed):
    """[batch, heads, q, dim] attention; key/value may have fewer (grouped) heads. `allowed` None means causal when
    queries and keys are the same tokens, else every key is visible."""
    causal = allowed is None and query.shape[2] == key.shape[2] and query.shape[2] > 1
    return F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, is_causal=causal,
                                          enable_gqa=key.shape[1] != query.shape[1])


def packed_attention_allowed(cu_seqlens, batch: int, seq: int):
    """--packing without varlen attention: bool [batch, 1, seq, seq], True where a query may see a key: causal and
    within its own sequence. cu_seqlens (int32 [sequences + 1]) are where the sequences start in the flattened
    [batch * seq] tokens; every row ends a sequence."""
    starts = torch.zeros(batch * seq, dtype=torch.long, device=cu_seqlens.device)
    starts[cu_seqlens[:-1].long()] = 1
    sequence = starts.cumsum(0).view(batch, seq)  # the sequence each token belongs to
    index = torch.arange(seq, device=cu_seqlens.device)
    causal = index[None, :] <= index[:, None]
    return ((sequence[:, :, None] == sequence[:, None, :]) & causal)[:, None]


def varlen_available(device, dtype) -> bool:
    """Whether torch's varlen attention (FlashAttention over cu_seqlens: CUDA, fp16/bf16) can run these tensors."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    try:
        import torch.nn.attention.varlen  # noqa: F401  torch >= 2.10
    except ImportError:
        return False
    return True


def varlen_sdpa(query, key, value, cu_seqlens):
    """Causal attention within each packed sequence, [batch, heads, seq, dim] in and out (key/value may have fewer,
    grouped heads): torch.nn.attention.varlen.varlen_attn over the flattened tokens. The longest sequence is at most
    a row, so the row length serves as max_q / max_k (the kernel only sizes its grid by it), and no device value is
    read back to the host."""
    from torch.nn.attention.varlen import varlen_attn

    batch, heads, seq, dim = query.shape

    def flat(x):  # [batch, h, seq, dim] -> [batch * seq, h, dim]
        return x.transpose(1, 2).reshape(batch * seq, x.shape[1], dim)

    context = varlen_attn(flat(query), flat(key), flat(value), cu_seqlens, cu_seqlens, seq, seq,
                          window_size=(-1, 0), enable_gqa=key.shape[1] != heads)  # (-1, 0): causal
    return context.view(batch, seq, heads, dim).transpose(1, 2)


def sdpa_attention(module, query, key, value, allowed, **kwargs):
    """`sdpa` in transformers' attention-interface convention, (module, query, key, value, mask, **kwargs) ->
    (context [batch, q, heads, dim], weights): the form DeepSpeed's Ulysses sequence parallelism wraps
    (sequence_parallel.py). Extra keyword arguments (the gathered position_ids) are not needed: causal masking
    covers the right-padded batches training feeds."""
    return sdpa(query, key, value, allowed).transpose(1, 2), None


def padding_or_none(attention_mask):
    """A 2-D padding mask, or None when it masks nothing (lets SDPA take its causal fast path)."""
    if attention_mask is None or attention_mask.dim() != 2 or bool(attention_mask.all()):
        return None
    return attention_mask


def as_cache(cache) -> Cache | None:
    """Accept the official tuple layout ((key [seq, batch, heads, dim], value), ...) as well as a Cache."""
    if cache is None or isinstance(cache, Cache):
        return cache
    return DynamicCache(ddp_cache_data=[(k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)) for k, v in cache])


class BodyMixin:
    """What both model bodies do around their own layers: the KV cache, the P-Tuning prefix, the layer loop.

    The prefix enters the cache once, ahead of the tokens, when generating; without a cache (training) it is handed
    to every layer, so gradient checkpointing (which drops caches) keeps it."""

    def start_cache(self, cache, use_cache, batch, device, dtype):
        """(cache, past_len: cached tokens not counting the prefix, prefix: per-layer (k, v) or None)."""
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        cache = as_cache(cache)
        if cache is None and use_cache:
            cache = DynamicCache()
        cached = cache.get_seq_length() if cache is not None else 0
        prefix = None
        if self.pre_seq_len and cached == 0:
            prefix = self.get_prompt(batch, device, dtype)
            if cache is not None:
                for i, (k, v) in enumerate(prefix):
                    cache.update(k, v, i)
                prefix = None
        return cache, max(cached - self.pre_seq_len, 0), prefix, use_cache

    def get_prompt(self, batch_size: int, device, dtype):
        """Per-layer prefix (key, value), each [batch, kv_heads, pre_seq_len, head_dim]; the prefix encoder's output
        is laid out [pre_seq_len, 2 * layers, kv_heads, head_dim] with keys at 2l and values at 2l + 1."""
        tokens = torch.arange(self.pre_seq_len, device=device).expand(batch_size, -1)
        kv = self.prefix_encoder(tokens).to(dtype)
        kv = self.dropout(kv.view(batch_size, self.pre_seq_len, 2 * self.config.num_layers, self.num_kv_heads,
                                  self.head_dim))
        kv = kv.permute(2, 0, 3, 1, 4)  # [2 * layers, batch, kv_heads, pre_seq_len, head_dim]
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(self.config.num_layers)]

    def prefixed_mask(self, full_mask, total_keys):
        """An official bool mask (True = masked) as SDPA's allowed-mask, the always visible prefix put in front."""
        allowed = ~full_mask.bool()
        if self.pre_seq_len and allowed.shape[-1] < total_keys:
            allowed = torch.cat([allowed.new_ones(*allowed.shape[:-1], self.pre_seq_len), allowed], dim=-1)
        return allowed

    def run_layers(self, layers, final_norm, hidden, layer_inputs, prefix, cache, use_cache,
                   output_hidden_states=False, **layer_kwargs):
        all_hidden = () if output_hidden_states else None
        for i, layer in enumerate(layers):
            if output_hidden_states:
                all_hidden += (hidden,)
            hidden = layer(hidden, *layer_inputs, prefix[i] if prefix is not None else None, cache=cache,
                           **layer_kwargs)
        hidden = final_norm(hidden)
        if output_hidden_states:
            all_hidden += (hidden,)
        return BaseModelOutputWithPast(last_hidden_state=hidden, hidden_states=all_hidden,
                                       **{CACHE_NAME: cache if use_cache else None})


# ----------------------------------------------------------------------------------------------------------------
# Loading a quantized model
# ----------------------------------------------------------------------------------------------------------------
# What bitsandbytes stores beside a quantized Linear's weight (save_pretrained of a 4/8-bit model): the NF4/FP4 block
# scales and code book, with double quantization those of the scales, the packed QuantState, and LLM.int8's row
# scales and layout. transformers 5.24 consumes these keys itself while loading; releases that list them as
# unexpected get them accepted here, but only on a module that really is quantized in the model just built.
QUANTIZATION_STATE_SUFFIXES = (".weight.absmax", ".weight.quant_map", ".weight.nested_absmax",
                               ".weight.nested_quant_map", ".weight.quant_state.bitsandbytes__nf4",
                               ".weight.quant_state.bitsandbytes__fp4", ".SCB", ".weight_format")
QUANTIZED_WEIGHT_CLASSES = ("Params4bit", "Int8Params")  # bitsandbytes' parameter classes, by name: no import here


def is_quantization_state(model, key: str) -> bool:
    """Whether a checkpoint key is the bitsandbytes quantization state of a Linear that `model` holds quantized. An
    ordinary (unquantized) model has no such module, so for it every such key stays unexpected."""
    for suffix in QUANTIZATION_STATE_SUFFIXES:
        if key.endswith(suffix):
            module_name = key[:-len(suffix)]
            try:
                module = model.get_submodule(module_name)
            except AttributeError:
                return False
            weight = getattr(module, "weight", None)
            return type(weight).__name__ in QUANTIZED_WEIGHT_CLASSES
    return False


# ----------------------------------------------------------------------------------------------------------------
# The model classes' common parent
# ----------------------------------------------------------------------------------------------------------------
class _TokenStreamer(BaseStreamer):
    """Hands generated tokens from generate() (running in a thread) to stream_chat()."""

    def __init__(self):
        self.queue, self.first = Queue(), True

    def put(self, value):
        if self.first:  # the prompt
            self.first = False
            return
        self.queue.put(value.reshape(-1).tolist())

    def end(self):
        self.queue.put(None)


class ChatMixin:
    """chat() / stream_chat() in the official format of the model's mode (model/template.py): for our models and,
    at inference, for transformers' own Glm4ForCausalLM (mode glm4-0414, `with_chat` in model/glm4_0414.py). Needs
    `mode`, `chat_defaults`, `generate` and `device`."""

    def _chat_generate_kwargs(self, tokenizer, kwargs):
        gen = dict(self.chat_defaults)
        if kwargs.get("max_new_tokens") is not None:  # the caller's limit replaces the default total length
            gen.pop("max_length", None)
        gen.update(kwargs)
        gen.setdefault("eos_token_id", template.stop_token_ids(tokenizer, self.mode))
        gen.setdefault("pad_token_id", tokenizer.pad_token_id)
        if not gen.get("do_sample", True):
            gen.pop("top_p", None), gen.pop("temperature", None)
        return gen

    def _chat_inputs(self, tokenizer, query, history, role):
        ids = template.encode_prompt(tokenizer, self.mode, query, history, role)
        return torch.tensor([ids], device=self.device)

    def _finish(self, tokenizer, query, history, role, new_ids):
        if self.mode in template.MESSAGE_MODES:
            history = list(history or []) + [{"role": role, "content": query}]
            return template.decode_response(tokenizer, self.mode, new_ids, history)
        response = template.decode_response(tokenizer, self.mode, new_ids)
        return response, list(history or []) + [(query, response)]

    @torch.inference_mode()
    def chat(self, tokenizer, query: str, history=None, role: str = "user", **kwargs):
        """One answer in the official format of this version: returns (response, history). glm3/glm4: the response
        is the text, a tool call {"name", "content"}, or the list of calls when the model makes several in one turn
        (see template.process_response); history gets one assistant message per call."""
        input_ids = self._chat_inputs(tokenizer, query, history, role)
        outputs = self.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                **self._chat_generate_kwargs(tokenizer, kwargs))
        return self._finish(tokenizer, query, history, role, outputs[0, input_ids.shape[1]:].tolist())

    @torch.inference_mode()
    def stream_chat(self, tokenizer, query: str, history=None, role: str = "user", **kwargs):
        """Like chat(), yielding (response so far, history) after every generated token."""
        input_ids = self._chat_inputs(tokenizer, query, history, role)
        streamer = _TokenStreamer()
        gen_kwargs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer,
                          **self._chat_generate_kwargs(tokenizer, kwargs))
        errors = []

        def run():
            try:
                with torch.inference_mode():
                    self.generate(**gen_kwargs)
            except Exception as error:  # handed to the caller's thread below
                errors.append(error)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        new_ids = []
        while (tokens := streamer.queue.get()) is not None:
            new_ids += tokens
            response = tokenizer.decode(new_ids)
            if response and response[-1] != "\ufffd":  # wait for a whole character
                yield self._finish(tokenizer, query, history, role, list(new_ids))
        thread.join()
        if errors:
            raise errors[0]
        yield self._finish(tokenizer, query, history, role, list(new_ids))


class ChatGLMPreTrainedBase(ChatMixin, PreTrainedModel, GenerationMixin):
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    # Official checkpoints store the rotary inv_freq buffer; we compute it, so it is no weight to load.
    _keys_to_ignore_on_load_unexpected = [r"inv_freq"]
    # A P-Tuning model (pre_seq_len) is built on a base checkpoint, which has no prefix encoder: its weights come
    # from the checkpoint's prefix_encoder.safetensors afterwards (inference._load_prefix, which fails unless every one
    # is there) or start from their initialisation for training, as in THUDM's code. Without this, transformers'
    # load report calls them MISSING ("newly initialized ... Consider training"), a false alarm; any other missing
    # weight is still reported, and from_pretrained below refuses it.
    _keys_to_ignore_on_load_missing = [r"(^|\.)prefix_encoder\."]
    mode = "glm"  # set by each model class; names the chat template
    chat_defaults = {}
    supports_packing = False  # takes packed rows (position_ids and cu_seqlens, see packing.py)

    def _init_weights(self, module):
        std = 0.02
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif hasattr(module, "weight") and isinstance(getattr(module, "weight"), nn.Parameter) \
                and module.weight.dim() == 1:  # LayerNorm / RMSNorm
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    # -- loading -------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load an official (or our own) checkpoint directory; every weight must be found under its official name.

        Missing weights are an error (never a silent random initialisation), except the prefix encoder of a P-Tuning
        model built on a base checkpoint (pass pre_seq_len=N), which starts from its initialisation as in THUDM's code.
        """
        path = str(pretrained_model_name_or_path)
        check_checkpoint_dir(path, cls.mode)
        if not any(name.endswith((".safetensors", ".bin")) for name in os.listdir(path)):
            raise FileNotFoundError(f"{path}: no *.safetensors or *.bin weight files in this checkpoint directory")
        check_safetensors_headers(path)
        want_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(path, *args, output_loading_info=True, **kwargs)
        except RuntimeError as e:  # transformers' weight conversion (e.g. bitsandbytes deserialising) failed
            if "conversion of the weights" not in str(e):
                raise
            raise ValueError(f"{path}: weights could not be converted while loading (a quantized checkpoint missing "
                             f"part of its quantization state?); the CONVERSION lines above name them") from None
        missing = info.get("missing_keys", [])  # without the prefix encoder's (see _keys_to_ignore_on_load_missing)
        problems = []
        if missing:
            problems.append(f"missing weights {sorted(missing)[:5]}{' ...' if len(missing) > 5 else ''}")
        unexpected = [k for k in info.get("unexpected_keys", []) if "inv_freq" not in k]
        unexpected = [k for k in unexpected if not is_quantization_state(model, k)]
        if unexpected:
            problems.append(f"unexpected weights {sorted(unexpected)[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if info.get("mismatched_keys"):
            problems.append(f"weights of the wrong shape {list(info['mismatched_keys'])[:5]}")
        if problems:
            raise ValueError(f"{path}: " + "; ".join(problems))
        model.retie_as_official(path)
        model.config.__dict__[VERSION_KEY] = cls.mode
        return (model, info) if want_info else model

    def retie_as_official(self, path: str) -> None:
        """A tied model (ChatGLM-6B) whose checkpoint stores both keys with different values: transformers then
        leaves the two apart (with a warning). THUDM's code (transformers 4.x) holds one matrix and copies every key
        into it in module order, so the LM head's values, loaded last, are the ones it runs; do the same."""
        if not getattr(self.config, "tie_word_embeddings", False) or not self._tied_weights_keys:
            return
        apart = [(target, source) for target, source in self._tied_weights_keys.items()
                 if self.get_parameter(target) is not self.get_parameter(source)]
        if not apart:
            return
        for target, source in apart:
            target_param, source_param = self.get_parameter(target), self.get_parameter(source)
            logger.warning("%s: %s and %s differ, but this model ties them (config.json does not set "
                           "\"tie_word_embeddings\": false); both now hold %s, as in THUDM's code", path, target,
                           source, target)
            with torch.no_grad():
                source_param.copy_(target_param)
        self.tie_weights()
        self.all_tied_weights_keys = self.get_expanded_tied_weights_keys(all_submodels=True)

    # -- the causal-LM forward -----------------------------------------------------------------------------------
    def get_output_embeddings(self):
        return self.output_head

    def forward(self, input_ids=None, position_ids=None, attention_mask=None, cache=None,
                inputs_embeds=None, labels=None, use_cache=None, return_dict=None, reduction="mean",
                return_logits=None, logits_to_keep=0, past_key_values=None, shift_labels=None, **kwargs):
        """Logits, and with `labels` the causal-LM loss over positions whose label is not -100.

        The KV cache comes as `cache` (transformers >= 5.24) or `past_key_values` (older releases) and goes back
        in the output under the installed release's field name. With labels, logits are only computed when
        `return_logits=True` (training never needs them). Packed rows (packing.py) add `cu_seqlens`; `shift_labels`
        instead of `labels`: targets already aligned with the positions (see labelled_loss)."""
        if kwargs.get("cu_seqlens") is not None and not self.supports_packing:
            raise ValueError(f"{type(self).__name__} does not take packed rows (cu_seqlens)")
        outputs = self.transformer(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                                   cache=given_cache(cache, past_key_values), inputs_embeds=inputs_embeds,
                                   use_cache=use_cache, **kwargs)
        hidden = outputs.last_hidden_state  # [batch, seq, hidden]
        loss = None
        if labels is not None or shift_labels is not None:
            loss = labelled_loss(self.output_head, hidden, labels, reduction, shift_labels=shift_labels)
        logits = None
        if (labels is None and shift_labels is None) or return_logits:
            if logits_to_keep:
                hidden = hidden[:, -logits_to_keep:]
            logits = self.output_head(hidden)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_NAME: output_cache(outputs)})

    # -- generation ----------------------------------------------------------------------------------------------
    def prepare_inputs_for_generation(self, input_ids, cache=None, attention_mask=None, past_key_values=None,
                                      **kwargs):
        """Positions (and for ChatGLM-6B the prefix-LM mask) depend on the whole sequence, so they are computed
        here from all ids so far, before generate() keeps only the new ones."""
        if kwargs.get("position_ids") is None:
            kwargs["position_ids"] = self.transformer.position_ids_for(input_ids, attention_mask)
        kwargs[CACHE_NAME] = given_cache(cache, past_key_values)
        return super().prepare_inputs_for_generation(input_ids, attention_mask=attention_mask, **kwargs)

    def _prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs):
        # generate() would build 1-D positions once and count them up; ChatGLM-6B's are 2-D and its first row stays
        # at the [gMASK] position, so positions are derived from the ids at every step instead (see above).
        return None

