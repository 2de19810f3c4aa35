"""GLM-4-0414 / GLM-Z1-0414 (mode `glm4-0414`): transformers' own `Glm4ForCausalLM` and the checkpoint's own
tokenizer files (tokenizer.json, tokenizer_config.json with its `chat_template`). No model code of ours: the upstream
class is the reference implementation; the chat format is model/chat_template.py.

`write_tiny_checkpoint` writes a tiny checkpoint in the shipped layout for tests and the demo: config.json of
`Glm4ForCausalLM` (model_type glm4, the official field names and GLM-4-9B-0414's ratios: partial rotary 0.5, 2 KV
heads, attention bias, untied head), model.safetensors under the official weight names, tokenizer.json made with the
`tokenizers` library (a byte-level BPE trained on model/tiny_corpus.txt, the GLM-4 special tokens added in their
official order, plus <think> and </think>) and tokenizer_config.json with the chat template kept in
model/templates/ (see its PROVENANCE.md). It loads with AutoTokenizer / AutoModelForCausalLM, without remote code.
"""
from __future__ import annotations

import json
import os

MODE_NAME = "glm4-0414"
TEMPLATE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")
# The chat templates kept as data, by variant (PROVENANCE.md says where each comes from). Only GLM-Z1's was found.
TEMPLATES = {"z1": "glm_z1_0414.jinja"}
# GLM-4's special tokens in their official order (ids 151329.. in the official vocabulary), then the thinking tags.
SPECIAL_TOKENS = ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                  "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
                  "<|end_of_video|>")
THINK_TOKENS = ("<think>", "</think>")
TINY_VOCAB = 640


def read_template(variant: str = "z1") -> str:
    with open(os.path.join(TEMPLATE_DIR, TEMPLATES[variant]), encoding="utf-8") as f:
        return f.read()


def build_tokenizer(chat_template: str):
    """A PreTrainedTokenizerFast over a small byte-level BPE with GLM-4's special tokens and `chat_template`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .sp_build import CORPUS_FILE

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train([CORPUS_FILE], trainer)
    from tokenizers import AddedToken
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS])
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in THINK_TOKENS])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   padding_side="left", clean_up_tokenization_spaces=False,
                                   chat_template=chat_template, model_max_length=128000)


def template_into_tokenizer_config(directory: str, chat_template: str) -> None:
    """The official layout: the template inside tokenizer_config.json, no chat_template.jinja (what transformers'
    save_pretrained writes beside it)."""
    config_file = os.path.join(directory, "tokenizer_config.json")
    with open(config_file, encoding="utf-8") as f:
        tokenizer_config = json.load(f)
    tokenizer_config["chat_template"] = chat_template
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(config_file, "w", encoding="utf-8") as f:
        f.write(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")
    jinja = os.path.join(directory, "chat_template.jinja")
    if os.path.exists(jinja):
        os.remove(jinja)


def tiny_config(tokenizer):
    from transformers import Glm4Config

    stops = [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]
    return Glm4Config(vocab_size=(len(tokenizer) + 63) // 64 * 64, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      partial_rotary_factor=0.5, attention_bias=True, max_position_embeddings=2048,
                      rms_norm_eps=1e-5, tie_word_embeddings=False, eos_token_id=stops,
                      pad_token_id=tokenizer.pad_token_id, bos_token_id=None)


def write_tiny_checkpoint(output_dir: str, seed: int = 0, variant: str = "z1") -> str:
    """A tiny Glm4ForCausalLM checkpoint in the official layout (see the module doc) in output_dir, which must not
    exist or be empty (FileExistsError otherwise)."""
    import torch
    from transformers import Glm4ForCausalLM

    from .export import atomic_directory
    from .tiny import draw_strong_weights

    chat_template = read_template(variant)
    with atomic_directory(output_dir) as staging:
        tokenizer = build_tokenizer(chat_template)
        tokenizer.save_pretrained(staging)
        template_into_tokenizer_config(staging, chat_template)
        torch.manual_seed(seed)
        model = Glm4ForCausalLM(tiny_config(tokenizer))
        draw_strong_weights(model, seed)
        model.save_pretrained(staging)
    return output_dir


def is_glm4_0414_config(config_dict: dict) -> bool:
    """transformers' GLM-4 (0414 generation: GLM-4-9B/32B-0414, GLM-Z1-*) by model_type or architectures."""
    return config_dict.get("model_type") == "glm4" or "Glm4ForCausalLM" in (config_dict.get("architectures") or [])


def num_layers(config) -> int:
    """Layers of a config of any mode (ChatGLM: num_layers; transformers' Glm4: num_hidden_layers)."""
    return getattr(config, "num_layers", None) or config.num_hidden_layers


def with_chat(model):
    """The loaded model (or the Glm4ForCausalLM under a PEFT wrapper) given chat() / stream_chat() in the
    checkpoint's own chat format, for predict.py and web_demo.py: its class becomes `Glm4ForChat`, which only adds
    those methods (inference only: nothing is saved from it)."""
    from transformers import Glm4ForCausalLM

    for module in model.modules():
        if type(module) is Glm4ForCausalLM:
            module.__class__ = _chat_class()
    return model


def _chat_class():
    global _CHAT_CLASS
    if _CHAT_CLASS is None:
        from transformers import Glm4ForCausalLM

        from .modeling_base import ChatMixin

        class Glm4ForChat(ChatMixin, Glm4ForCausalLM):
            mode = MODE_NAME
            # our glm4 chat() defaults (modeling_chatglm2.py); the caller's flags replace them
            chat_defaults = {"max_length": 8192, "num_beams": 1, "do_sample": True, "top_p": 0.8, "temperature": 0.8}
        _CHAT_CLASS = Glm4ForChat
    return _CHAT_CLASS


_CHAT_CLASS = None
