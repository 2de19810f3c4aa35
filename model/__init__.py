"""Our own ChatGLM-6B / ChatGLM2-6B / ChatGLM3-6B / GLM-4-9B implementations and the MODE registry.

`MODE[mode]` (mode in glm, glm2, glm3, glm4) names what each version is made of: config, model and tokenizer classes and
the tokenizer file of the official checkpoint. The chat template of each version lives in model/template.py, keyed
by the same mode name; training, chat() and predict.py all use it.
"""
import python_check  # noqa: F401  first: refuses a Python older than 3.10 in one line
from dataclasses import dataclass

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
}

__all__ = ["MODE", "ModeSpec", "ChatGLMConfig", "ChatGLM2Config", "ChatGLM4Config", "check_checkpoint_dir",
           "detect_version"]
