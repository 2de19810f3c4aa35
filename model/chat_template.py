"""GLM-4-0414 and GLM-Z1-0414 (mode `glm4-0414`): training ids, labels and chat prompts rendered by the checkpoint's
OWN chat template (its tokenizer_config.json `chat_template`, through transformers' `apply_chat_template`).

Nothing of the format is written here: a conversation is rendered by the template, message by message, and the
labels are read off that rendering. What is ours is only what training needs beside it:

- The template takes OpenAI-style `tools=`; our messages carry them on a system message (tool_data.py), which is
  turned into the `tools` argument (the system message itself stays only if it has text).
- Thinking (GLM-Z1): a message's `reasoning_content` (the OpenAI/DeepSeek form) is written inline as
  `<think>{reasoning}</think>{content}`, the form the model writes. The official template keeps only what follows
  the last `</think>` of every turn it renders, so earlier turns lose their thinking exactly as the template renders
  history. The FINAL assistant turn of a training sample is written as the model generates it: the template's
  generation prompt (Z1: `<|assistant|>\\n<think>`) followed by the thinking, `</think>` and the answer. A final
  turn without thinking is rendered as the template renders a non-thinking turn (`<|assistant|>\\n{answer}`).
- Labels, as THUDM's GLM-4 finetune_demo labels the GLM-4 format (see model/template.py): a learned assistant turn
  learns everything after its `<|assistant|>` token (metadata line of a tool call included) and the token that
  follows the turn (the next role token); after the last turn `<|user|>` is appended and learned, the stop token
  chat() generates. `thinking="mask"` leaves the thinking of the final turn (up to and including `</think>`)
  unlearned: it is context, only the answer is learned.

A template that does not render a conversation left to right (a later message changing what was rendered before,
e.g. a system message after the first user turn, which GLM-Z1's template moves to the front) is refused with one
line: labels could not be read off it.
"""
from __future__ import annotations

MODE_NAME = "glm4-0414"
# every mode whose ids come from the checkpoint's own chat template (glm4-moe*: model/glm4_moe.py)
TEMPLATE_MODES = (MODE_NAME, "glm4-moe", "glm4-moe-lite")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
THINKING_CHOICES = ("learn", "mask")
IGNORE_INDEX = -100


def with_inline_thinking(message: dict) -> dict:
    """The message for the template: `reasoning_content` written inline before the content; other keys kept."""
    reasoning = message.get("reasoning_content")
    message = {k: v for k, v in message.items() if k != "reasoning_content"}
    if reasoning:
        message["content"] = f"{THINK_OPEN}{reasoning}{THINK_CLOSE}{message.get('content') or ''}"
    return message


def template_inputs(messages: list[dict], tokenizer=None) -> tuple[list[dict], list | None]:
    """(messages, tools) as the template takes them: the tools of system messages become `tools`, a system message
    without text then goes; thinking is written inline; for a template that takes OpenAI `tool_calls` (GLM-4.5 and
    later) our `metadata` calls become them (glm4_moe.with_tool_calls)."""
    from .glm4_moe import takes_tool_calls, with_tool_calls
    if tokenizer is not None and takes_tool_calls(getattr(tokenizer, "chat_template", None)):
        messages = with_tool_calls(messages)
    tools, converted = None, []
    for message in messages:
        if message["role"] == "system" and "tools" in message:
            tools = (tools or []) + list(message["tools"])
            message = {k: v for k, v in message.items() if k != "tools"}
            if not message.get("content"):
                continue
        converted.append(with_inline_thinking(message))
    return converted, tools


def render(tokenizer, messages: list[dict], tools, generation_prompt: bool) -> str:
    """The checkpoint's chat template applied to template-ready messages (`template_inputs`), as text."""
    return tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=generation_prompt,
                                         tokenize=False)


def encode_text(tokenizer, text: str) -> list[int]:
    """Ids of rendered text: what apply_chat_template(tokenize=True) gives for it (no special tokens added)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_context(tokenizer, messages: list[dict]) -> list[int]:
    """Ids of the prompt the model answers: the conversation with the template's generation prompt."""
    converted, tools = template_inputs(messages, tokenizer)
    return encode_text(tokenizer, render(tokenizer, converted, tools, generation_prompt=True))


def _final_turn_with_thinking(tokenizer, converted, tools, before: str, rendered_turn: str):
    """(turn text, offset in it where the model's own writing starts, offset after `</think>`), or None when the
    template rendered the final turn's thinking itself (or there is none)."""
    content = converted[-1].get("content") or ""
    if THINK_CLOSE not in content or THINK_CLOSE in rendered_turn:
        return None
    generation = render(tokenizer, converted[:-1], tools, generation_prompt=True)
    if not generation.startswith(before) or not before:
        raise ValueError(f"--mode {MODE_NAME}: the chat template's generation prompt does not continue the "
                         f"conversation before it; its labels cannot be read off the rendering")
    cue = generation[len(before):]
    body = content.lstrip()
    if cue.endswith(THINK_OPEN) and body.startswith(THINK_OPEN):  # the prompt opens the thinking already
        body = body[len(THINK_OPEN):]
    turn = cue + body
    return turn, len(cue), len(cue) + body.rindex(THINK_CLOSE) + len(THINK_CLOSE)


def encode_messages(tokenizer, messages: list[dict], learn_all_turns: bool = True, thinking: str = "learn"):
    """(input_ids, labels, answer_start) of a training conversation ending with an assistant message (see the
    module docstring); answer_start is where the final answer begins (the prompt chat() would build before it)."""
    if thinking not in THINKING_CHOICES:
        raise ValueError(f"--thinking {thinking!r}: expected one of {', '.join(THINKING_CHOICES)}")
    converted, tools = template_inputs(messages, tokenizer)
    last = len(converted) - 1
    text = ""  # what is rendered so far (transformers refuses to render an empty conversation)
    spans = []  # (start, end) character spans of the rendering whose tokens are learned
    for index, message in enumerate(converted):
        whole = render(tokenizer, converted[:index + 1], tools, generation_prompt=False)
        if not whole.startswith(text):
            raise ValueError(f"--mode {MODE_NAME}: the chat template renders message {index + 1} "
                             f"({message['role']}) by changing what it rendered before (a system message after the "
                             f"first turn?); put system messages first")
        turn, start = whole[len(text):], None
        if message["role"] == "assistant" and (index == last or learn_all_turns):
            role_token = "<|assistant|>"
            start = turn.index(role_token) + len(role_token) if role_token in turn else 0
            if index == last:
                written = _final_turn_with_thinking(tokenizer, converted, tools, text, turn)
                if written:
                    turn, start, after_thinking = written
                    if thinking == "mask":
                        start = after_thinking
                elif thinking == "mask" and THINK_CLOSE in turn[start:]:  # the template rendered it (GLM-4.5 on)
                    start = turn.rindex(THINK_CLOSE) + len(THINK_CLOSE)
        if start is not None:
            spans.append((len(text) + start, len(text) + len(turn)))
        text += turn
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoding["input_ids"]), encoding["offset_mapping"]
    learned = [False] * len(ids)
    for span_start, span_end in spans:
        for position, (token_start, token_end) in enumerate(offsets):
            if span_start <= token_start and token_end <= span_end and token_end > token_start:
                learned[position] = True
            elif token_start == span_end and token_end > token_start:  # the token after a learned turn
                learned[position] = True
                break
    ids.append(tokenizer.convert_tokens_to_ids("<|user|>"))  # as the finetune_demo appends after the last answer
    learned.append(bool(spans) and spans[-1][1] == len(text))
    labels = [token if flag else IGNORE_INDEX for token, flag in zip(ids, learned)]
    prompt = encode_context(tokenizer, messages[:-1])
    answer_start = len(prompt) if ids[:len(prompt)] == prompt else last_answer_start(learned)
    return ids, labels, answer_start


def last_answer_start(learned: list[bool]) -> int:
    """Where the final run of learned tokens begins (the answer, when the prompt is not a prefix of the ids);
    model/template.py uses it too."""
    start = len(learned)
    while start > 0 and learned[start - 1]:
        start -= 1
    return start


def split_thinking(response: str) -> tuple[str, str]:
    """(thinking, answer) of generated text: the thinking is what comes before the last `</think>` (the generation
    prompt opened it; a `<think>` the model wrote itself is dropped); no `</think>`: no thinking."""
    if THINK_CLOSE not in response:
        return "", response
    thinking, answer = response.rsplit(THINK_CLOSE, 1)
    thinking = thinking.strip()
    if thinking.startswith(THINK_OPEN):
        thinking = thinking[len(THINK_OPEN):].strip()
    return thinking, answer.strip()
