"""Our own ChatGLM-6B / ChatGLM2-6B / ChatGLM3-6B / GLM-4-9B implementations and the MODE registry.

`glm4-0414` (GLM-4-9B/32B-0414, GLM-Z1-*-0414) is registered with transformers' own Glm4Config / Glm4ForCausalLM
and AutoTokenizer over the checkpoint's tokenizer.json: no model code of ours (model/glm4_0414.py,
model/chat_template.py).

`MODE[mode]` (mode in glm, glm2, glm3, glm4) names what each version is made of: config, model and tokenizer classes and
the tokenizer file of the official checkpoint. The chat template of each version lives in model/template.py, keyed
by the same mode name; training, chat() and predict.py all use it.
"""
import python_check  # noqa: F401  first: refuses a Python older than 3.10 in one line
from dataclasses import dataclass

from transformers import (AutoTokenizer, Glm4Config, Glm4ForCausalLM, Glm4MoeConfig, Glm4MoeForCausalLM,
                          Glm4MoeLiteConfig, Glm4MoeLiteForCausalLM)

from . import glm4_moe  # noqa: F401  (ignores the MTP layer on load: glm4_moe._ignore_mtp_on_load)
from .config import ChatGLM2Config, ChatGLM4Config, ChatGLMConfig, check_checkpoint_dir, detect_version
from .modeling_chatglm import ChatGLMForConditionalGeneration
from .modeling_chatglm2 import (ChatGLM2ForConditionalGeneration, ChatGLM3ForConditionalGeneration,
                                ChatGLM4ForConditionalGeneration)
from .tokenization import ChatGLM2Tokenizer, ChatGLM3Tokenizer, ChatGLMTokenizer
from .tokenization_glm4 import ChatGLM4Tokenizer


@dataclass(frozen=True)
class ModeSpec:
    name: str
    config: type
    model: type
    tokenizer: type
    tokenizer_file: str  # the vocabulary file of the official checkpoint directory (sentencepiece; glm4: tiktoken)


MODE = {
    "glm": ModeSpec("glm", ChatGLMConfig, ChatGLMForConditionalGeneration, ChatGLMTokenizer, "ice_text.model"),
    "glm2": ModeSpec("glm2", ChatGLM2Config, ChatGLM2ForConditionalGeneration, ChatGLM2Tokenizer, "tokenizer.model"),
    "glm3": ModeSpec("glm3", ChatGLM2Config, ChatGLM3ForConditionalGeneration, ChatGLM3Tokenizer, "tokenizer.model"),
    "glm4": ModeSpec("glm4", ChatGLM4Config, ChatGLM4ForConditionalGeneration, ChatGLM4Tokenizer, "tokenizer.model"),
    "glm4-0414": ModeSpec("glm4-0414", Glm4Config, Glm4ForCausalLM, AutoTokenizer, "tokenizer.json"),
    # GLM-4.5/4.6/4.7 and GLM-4.7-Flash, mixture of experts (model/glm4_moe.py)
    "glm4-moe": ModeSpec("glm4-moe", Glm4MoeConfig, Glm4MoeForCausalLM, AutoTokenizer, "tokenizer.json"),
    "glm4-moe-lite": ModeSpec("glm4-moe-lite", Glm4MoeLiteConfig, Glm4MoeLiteForCausalLM, AutoTokenizer,
                              "tokenizer.json"),
}
# modes whose model is transformers' own class, not ours: its own loss interface, no P-Tuning prefix; chat() is
# added at inference (model/glm4_0414.with_chat, model/glm4_moe.with_chat)
UPSTREAM_MODES = ("glm4-0414", "glm4-moe", "glm4-moe-lite")

__all__ = ["MODE", "ModeSpec", "UPSTREAM_MODES",
           "ChatGLMConfig", "ChatGLM2Config", "ChatGLM4Config", "check_checkpoint_dir",
           "detect_version"]
