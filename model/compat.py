"""The one place that follows transformers' renames across the 5.x releases we support (see requirements.txt).

- 5.24 renamed the KV cache from `past_key_values` to `cache`: the forward argument, the argument of
  prepare_inputs_for_generation and the field of the output classes (the old name stays a deprecation shim until
  5.40). Our models accept both names on input and speak the installed release's name to transformers, so
  generate() hands the cache back to us under whichever name it uses.
- 5.23 renamed `gradient_checkpointing_enable` to `activation_checkpointing_enable` (same arguments).
"""
from __future__ import annotations

from transformers.modeling_outputs import CausalLMOutputWithPast

CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def given_cache(cache, past_key_values):
    """The KV cache passed under either name (`cache`, or `past_key_values` from older callers); not both."""
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the KV cache as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


def output_cache(outputs):
    """The cache field of a transformers output object, under the installed release's name."""
    return getattr(outputs, CACHE_NAME)


def enable_activation_checkpointing(model, every_n_layers: int = 1) -> None:
    """transformers' activation (gradient) checkpointing of every `every_n_layers`-th layer, non-reentrant. Also
    makes the embeddings' output require grad, so a frozen base still back-propagates into LoRA / the prefix."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False}, every_n_layers=every_n_layers)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False},
                                            every_n_layers=every_n_layers)
