"""Our own ChatGLM-6B / ChatGLM2-6B / ChatGLM3-6B implementations and the MODE registry.

`MODE[mode]` (mode in glm, glm2, glm3) names what each version is made of: config, model and tokenizer classes and
the tokenizer file of the official checkpoint. The chat template of each version lives in model/template.py, keyed
by the same mode name; training, chat() and predict.py all use it.
"""
from dataclasses import dataclass

from .config import ChatGLM2Config, ChatGLMConfig, check_checkpoint_dir, detect_version
from .modeling_chatglm import ChatGLMForConditionalGeneration
from .modeling_chatglm2 import ChatGLM2ForConditionalGeneration, ChatGLM3ForConditionalGeneration
from .tokenization import ChatGLM2Tokenizer, ChatGLM3Tokenizer, ChatGLMTokenizer


@dataclass(frozen=True)
class ModeSpec:
    name: str
    config: type
    model: type
    tokenizer: type
    tokenizer_file: str  # the sentencepiece file of the official checkpoint directory


MODE = {
    "glm": ModeSpec("glm", ChatGLMConfig, ChatGLMForConditionalGeneration, ChatGLMTokenizer, "ice_text.model"),
    "glm2": ModeSpec("glm2", ChatGLM2Config, ChatGLM2ForConditionalGeneration, ChatGLM2Tokenizer, "tokenizer.model"),
    "glm3": ModeSpec("glm3", ChatGLM2Config, ChatGLM3ForConditionalGeneration, ChatGLM3Tokenizer, "tokenizer.model"),
}

__all__ = ["MODE", "ModeSpec", "ChatGLMConfig", "ChatGLM2Config", "check_checkpoint_dir", "detect_version"]
