"""Chat templates: the one place that turns a conversation into token ids.

Training samples (`encode_messages`), `model.chat()` / `stream_chat()` and predict.py (`encode_prompt`) all call
`_pieces` below, so a model fine-tuned here is prompted at inference exactly as it was trained, and in the official
format of each version, so that it behaves the same under THUDM's own `chat()`:

- glm  (ChatGLM-6B):  the raw query when there is no history; otherwise rounds numbered from 0,
  "[Round i]\\n问：{q}\\n答：{a}\\n" ... "[Round n]\\n问：{q}\\n答：", then [gMASK] <sop>; the answer ends with <eop>.
- glm2 (ChatGLM2-6B): [gMASK] sop "[Round 1]\\n\\n问：{q}\\n\\n答：{a}\\n\\n[Round 2]..." rounds numbered from 1; the
  answer ends with eos.
- glm3 (ChatGLM3-6B): [gMASK] sop, then per message <|role|> + "{metadata}\\n" + content; the prompt ends with
  <|assistant|>, the model writes "\\n" + answer and then eos (or <|user|> / <|observation|>). A tool call's content
  is ChatGLM3's "```python\\ntool_call(key=value)\\n```" (tool_data writes the data so; `call_arguments` reads it).
- glm4 (GLM-4-9B-Chat): [gMASK] <sop>, then per message <|role|> + "{metadata}\\n{content}" (one text, as the official
  chat template renders it; messages with empty content are left out as there); the prompt ends with <|assistant|>,
  the model writes "\\n" + answer and stops on <|endoftext|>, <|user|> or <|observation|> (there is no end-of-turn
  token: the next role token ends a turn). A system message with `tools` first renders the official tool system
  prompt of GLM-4 with one section per function (`glm4_tool_prompt`). A tool call is an assistant message whose
  metadata is the function name and whose content is the JSON arguments (<|assistant|>get_weather\\n{"city": ...});
  the tool's result comes back as an `observation` message.

A conversation is a list of messages {"role": "system"|"user"|"assistant"|"observation", "content": str}. Pieces are
text (encoded with `tokenizer.encode_text`) or special ids, each flagged as learned or not. glm2 encodes each run of
adjacent texts as one string, earlier answers included, as the official `chat()` encodes the history: the training
context before every learned answer is then exactly the ids `chat()` builds for that history (an answer encoded on
its own would start with sentencepiece's dummy-prefix "▁", which inference never sees). glm encodes its prompt as one
string and the answer after [gMASK] <sop> on its own, as the official fine-tuning code does; glm3 encodes every
message on its own, as the official `build_chat_input` does.

Why glm learns only the last answer: ChatGLM-6B attends bidirectionally over everything before [gMASK] <sop>, so the
answers of earlier rounds sit in the bidirectional context and cannot be trained as next-token targets.

What an answer learns (labels): glm its text and <eop>; glm2 its text, and eos after the last answer only (the
official glm2 chat() puts none between rounds); glm3 "\\n" + its text, then eos at the
end of the sample or, for an earlier turn, the role token that follows it. glm4 follows THUDM's GLM-4 finetune_demo,
the official reference: an assistant message learns everything after its <|assistant|> ("{metadata}\\n" + content,
so a tool call's name and arguments too) and the role token that follows it (<|user|>, <|observation|> ...);
after the last answer <|user|> is appended and learned, where glm3 puts eos. Both stop tokens end generation. An
empty final glm4 answer, which the official template leaves out, is written as "\n" and learns that and <|user|>:
what the model must generate for chat() to return "" (see `_glm4_pieces`).
"""
from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass

from . import chat_template, glm4_moe

ROLES = ("system", "user", "assistant", "observation")
# modes whose chat history is a list of message dicts (roles, tools, metadata)
MESSAGE_MODES = ("glm3", "glm4") + chat_template.TEMPLATE_MODES
IGNORE_INDEX = -100

# The official tool system prompt of GLM-4: the fixed text that the chat template of THUDM/glm-4-9b-chat
# (tokenizer_config.json) puts after <|system|> when a message has `tools`, then one section per function tool. The
# model was trained on exactly this text, so it is reproduced as data here; only function tools are supported.
# A section starts with ONE newline: transformers' apply_chat_template (what THUDM's finetune_demo and the serving
# stacks call) compiles the template with trim_blocks=True, which drops the newline right after the
# `{% if tool['type'] == 'function' %}` tag that the template writes before "\n## {name}" (tests/test_glm4_tools.py).
GLM4_TOOL_SYSTEM_PROMPT = ("\n你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
                           "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具")
GLM4_TOOL_SECTION = "\n## {name}\n\n{description}\n在调用上述函数时，请使用 Json 格式表示调用的参数。"


@dataclass
class Piece:
    text: str | None = None  # text to encode, or None for `ids`
    ids: tuple[int, ...] = ()  # special token ids
    learned: bool = False  # True: these tokens carry labels


def special(tokenizer, name: str) -> int:
    """Id of a special token by its official name ("[gMASK]", "sop", "<|user|>" ...), for any of our tokenizers."""
    if hasattr(tokenizer, "get_command"):
        return tokenizer.get_command(name)
    glm_names = {"sop": "<sop>", "eop": "<eop>"}
    return tokenizer.convert_tokens_to_ids(glm_names.get(name, name))


def stop_token_ids(tokenizer, mode: str) -> list[int]:
    """Tokens that end an answer in generation (glm: <eop>; glm2: eos; glm3, glm4: eos, <|user|>, <|observation|>;
    for glm4 that is the official [151329, 151336, 151338])."""
    if mode in MESSAGE_MODES:
        return [tokenizer.eos_token_id, special(tokenizer, "<|user|>"), special(tokenizer, "<|observation|>")]
    return [tokenizer.eos_token_id]


def history_to_messages(mode: str, query: str | None, history=None, role: str = "user") -> list[dict]:
    """The official `chat()` arguments as a message list: history is [(q, a), ...] for glm/glm2, message dicts for
    glm3/glm4 (pairs are accepted there too)."""
    messages = []
    for item in history or []:
        if isinstance(item, dict):
            messages.append(dict(item))
        else:
            old_query, answer = item
            messages += [{"role": "user", "content": old_query}, {"role": "assistant", "content": answer}]
    if query is not None:
        messages.append({"role": role, "content": query})
    return messages


def _rounds(messages: list[dict], mode: str) -> list[list]:
    """[query, answer or None] rounds of a glm/glm2 conversation; a system message goes before the next query.
    Raises ValueError (one line) for what the format cannot hold: an observation turn, an assistant turn that does
    not answer a user turn, a user turn left unanswered before the next one."""
    rounds, system = [], ""
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "system":
            system += content + "\n"
        elif role == "user":
            if rounds and rounds[-1][1] is None:
                raise ValueError(f"--mode {mode}: two user turns in a row (every user turn but the last needs an "
                                 f"assistant answer)")
            rounds.append([system + content, None])
            system = ""
        elif role == "assistant":
            if not rounds:
                raise ValueError(f"--mode {mode}: the conversation starts with an assistant turn (it must start "
                                 f"with a user turn)")
            if rounds[-1][1] is not None:
                raise ValueError(f"--mode {mode}: two assistant turns in a row")
            rounds[-1][1] = content
        else:
            raise ValueError(f"--mode {mode}: role {role!r} is only supported by --mode glm3 and glm4")
    return rounds


def check_conversation(mode: str, messages: list[dict]) -> None:
    """Raise ValueError (one line) unless the template of `mode` can hold this conversation.

    glm3/glm4 (the official ChatGLM3 / GLM-4 formats): after any system messages the first turn is a user turn, and
    an observation turn (a tool's result) comes right after the assistant turn whose tool call it answers, or after
    another observation (several tool calls in a row, then their results in a row, as GLM-4's openai_api_server
    renders parallel calls). Anything else those formats allow stays allowed: several assistant turns in a row,
    tool call -> observation -> assistant, system messages later on."""
    if mode in ("glm", "glm2"):
        _rounds(messages, mode)
        return
    for message in messages:
        if message["role"] not in ROLES:
            raise ValueError(f"--mode {mode}: unknown role {message['role']!r} (expected one of {', '.join(ROLES)})")
    first = next((m["role"] for m in messages if m["role"] != "system"), "user")
    if first != "user":
        raise ValueError(f"--mode {mode}: the conversation starts with an {first} turn (after any system messages "
                         f"it must start with a user turn)")
    for number, (before, message) in enumerate(zip(messages, messages[1:]), start=2):
        # several tool calls in a row are answered by as many observations in a row (GLM-4's openai_api_server)
        if message["role"] == "observation" and before["role"] not in ("assistant", "observation"):
            raise ValueError(f"--mode {mode}: turn {number} is an observation following the {before['role']} turn (an "
                             f"observation must come right after the assistant turn whose tool call it answers, or "
                             f"after another observation)")


def _pieces(tokenizer, mode: str, messages: list[dict], learn_all_turns: bool) -> list[Piece]:
    """The template of each version, as pieces. A final assistant message is the answer; without one, the pieces
    end with the cue for the model to answer."""
    ends_with_answer = bool(messages) and messages[-1]["role"] == "assistant"
    if mode == "glm":
        rounds = _rounds(messages, mode)
        if len(rounds) == 1:
            prompt = rounds[0][0]
        else:
            prompt = "".join(f"[Round {i}]\n问：{q}\n答：{a}\n" for i, (q, a) in enumerate(rounds[:-1]))
            prompt += f"[Round {len(rounds) - 1}]\n问：{rounds[-1][0]}\n答："
        pieces = [Piece(text=prompt), Piece(ids=(special(tokenizer, "[gMASK]"), special(tokenizer, "sop")))]
        if ends_with_answer:
            pieces += [Piece(text=rounds[-1][1], learned=True), Piece(ids=(tokenizer.eos_token_id,), learned=True)]
        return pieces

    pieces = [Piece(ids=(special(tokenizer, "[gMASK]"), special(tokenizer, "sop")))]
    if mode == "glm2":
        rounds = _rounds(messages, mode)
        for i, (query, answer) in enumerate(rounds, start=1):
            sep = "" if i == 1 else "\n\n"
            pieces.append(Piece(text=f"{sep}[Round {i}]\n\n问：{query}\n\n答："))
            if answer is not None:
                last = i == len(rounds)
                pieces.append(Piece(text=answer, learned=last or learn_all_turns))
        if ends_with_answer:
            pieces.append(Piece(ids=(tokenizer.eos_token_id,), learned=True))
        return pieces

    if mode == "glm4":
        return _glm4_pieces(tokenizer, messages, learn_all_turns)
    if mode != "glm3":
        raise ValueError(f"unknown mode {mode!r}")
    last = len(messages) - 1
    learned_turn = [m["role"] == "assistant" and (i == last or learn_all_turns) for i, m in enumerate(messages)]
    for index, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ValueError(f"glm3: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if role == "system" and "tools" in message:
            content = content + "\n" + json.dumps(message["tools"], indent=4, ensure_ascii=False)
        # An earlier learned answer ends where the next role token starts: learning that token teaches the model
        # to stop there, which the official chat() treats as the end of the answer (it stops on <|user|>).
        role_learned = index > 0 and learned_turn[index - 1]
        pieces.append(Piece(ids=(special(tokenizer, f"<|{role}|>"),), learned=role_learned))
        metadata = message.get("metadata", "") or ""
        pieces += [Piece(text=f"{metadata}\n", learned=learned_turn[index]),
                   Piece(text=content, learned=learned_turn[index])]
    if ends_with_answer:
        pieces.append(Piece(ids=(tokenizer.eos_token_id,), learned=True))
    else:
        pieces.append(Piece(ids=(special(tokenizer, "<|assistant|>"),)))
    return pieces


def glm4_tool_prompt(tools) -> str:
    """The text after <|system|> for a GLM-4 system message with `tools` (OpenAI-style function tools:
    {"type": "function", "function": {"name": ..., "description": ..., "parameters": ...}})."""
    if not isinstance(tools, list):
        raise ValueError(f"glm4: 'tools' must be a list of function tools, got {type(tools).__name__}")
    text = GLM4_TOOL_SYSTEM_PROMPT
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict) \
                or not isinstance(function.get("name"), str):
            raise ValueError(f"glm4: every tool must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, "
                             f"got {json.dumps(tool, ensure_ascii=False)[:80]}")
        # json.dumps as the template's `tojson(indent=4)` renders it under transformers (its own tojson filter:
        # json.dumps with ensure_ascii=False, sort_keys=False): keys in their order, non-ASCII kept.
        text += GLM4_TOOL_SECTION.format(name=function["name"],
                                         description=json.dumps(function, ensure_ascii=False, indent=4))
    return text


def _glm4_pieces(tokenizer, messages: list[dict], learn_all_turns: bool) -> list[Piece]:
    """GLM-4's chat template (see the module docstring), labelled as THUDM's GLM-4 finetune_demo does."""
    last = len(messages) - 1
    pieces = [Piece(ids=(special(tokenizer, "[gMASK]"), special(tokenizer, "<sop>")))]
    learn_role_token = False  # the role token right after a learned answer is learned too
    for index, message in enumerate(messages):
        role = message["role"]
        if role not in ROLES:
            raise ValueError(f"glm4: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        learned = role == "assistant" and (index == last or learn_all_turns)
        blocks = []  # (role, text) rendered for this message
        if role == "system" and "tools" in message:
            blocks.append(("system", glm4_tool_prompt(message["tools"])))
        if message.get("content"):  # the official template leaves out messages with empty content
            blocks.append((role, f"{message.get('metadata') or ''}\n{message['content']}"))
        elif learned and index == last:
            # An empty final answer: the official template drops it (THUDM's finetune_demo then learns nothing from
            # it), but in chat the model must still answer the prompt's <|assistant|>: with "\n" and a stop token,
            # which chat() returns as "". It is written as every answer is, so it learns that "\n" and <|user|>.
            # (An earlier empty answer stays out, as the template leaves it out of every later prompt.)
            blocks.append((role, f"{message.get('metadata') or ''}\n"))
        for block_role, text in blocks:
            pieces += [Piece(ids=(special(tokenizer, f"<|{block_role}|>"),), learned=learn_role_token),
                       Piece(text=text, learned=learned)]
            learn_role_token = learned
    if messages and messages[-1]["role"] == "assistant":
        # The official finetune_demo appends <|user|> after the last answer: where the answer ends, as in chat.
        pieces.append(Piece(ids=(special(tokenizer, "<|user|>"),), learned=learn_role_token))
    else:
        pieces.append(Piece(ids=(special(tokenizer, "<|assistant|>"),)))
    return pieces


def _encode_run(tokenizer, texts: list[Piece]) -> tuple[list[int], list[bool]]:
    """Adjacent text pieces encoded as ONE string (the official glm2 chat() encodes its whole prompt, earlier answers
    included, this way). A learned piece's tokens are found by encoding the string up to each of its ends: they are
    learned only where both prefixes tokenise as a prefix of the whole, so that the context before every learned
    token is exactly what inference encodes. (Should a boundary ever merge into one token with its neighbour, that
    piece is left unlearned rather than trained on a context inference never builds.)"""
    whole = "".join(piece.text for piece in texts)
    ids = tokenizer.encode_text(whole)
    learned = [False] * len(ids)
    start = 0
    for piece in texts:
        end = start + len(piece.text)
        if piece.learned and piece.text:
            bounds = []
            for cut in (start, end):
                prefix = tokenizer.encode_text(whole[:cut]) if cut else []
                bounds.append(len(prefix) if ids[:len(prefix)] == prefix else None)
            if None not in bounds:
                learned[bounds[0]:bounds[1]] = [True] * (bounds[1] - bounds[0])
        start = end
    return ids, learned


def _encode(tokenizer, mode: str, pieces: list[Piece]) -> tuple[list[int], list[bool]]:
    """Token ids and a learned-flag per token. glm joins adjacent prompt texts into one string; glm2 encodes every
    run of adjacent texts (answers included) as one string, see `_encode_run`."""
    runs: list = []
    for piece in pieces:
        joins = runs and piece.text is not None and isinstance(runs[-1], list) and (
            mode == "glm2" or (mode == "glm" and not piece.learned and not runs[-1][-1].learned))
        if joins:
            runs[-1].append(piece)
        else:
            runs.append([piece] if piece.text is not None and mode in ("glm", "glm2") else piece)
    ids, learned = [], []
    for run in runs:
        if isinstance(run, list):
            if len(run) == 1 or not any(p.learned for p in run):
                run_ids = tokenizer.encode_text("".join(p.text for p in run))
                run_learned = [run[0].learned] * len(run_ids)
            else:
                run_ids, run_learned = _encode_run(tokenizer, run)
        else:
            run_ids = tokenizer.encode_text(run.text) if run.text is not None else list(run.ids)
            run_learned = [run.learned] * len(run_ids)
        ids += run_ids
        learned += run_learned
    return ids, learned


def encode_prompt(tokenizer, mode: str, query: str, history=None, role: str = "user") -> list[int]:
    """Ids of the prompt the model answers: what `chat()` and predict.py feed to `generate()`."""
    return encode_context(tokenizer, mode, history_to_messages(mode, query, history, role))


def encode_context(tokenizer, mode: str, messages: list[dict]) -> list[int]:
    """Ids of the prompt for a conversation that does not end with an answer, ending with the cue to answer."""
    if mode in chat_template.TEMPLATE_MODES:  # the checkpoint's own chat template
        return chat_template.encode_context(tokenizer, messages)
    ids, _ = _encode(tokenizer, mode, _pieces(tokenizer, mode, messages, learn_all_turns=False))
    return ids


def encode_messages(tokenizer, mode: str, messages: list[dict], learn_all_turns: bool = True,
                    thinking: str = "learn"):
    """Ids and labels of a training conversation ending with an assistant message.

    Returns (input_ids, labels, answer_start): labels are -100 wherever nothing is learned; answer_start is the
    index where the final answer begins (everything before it is the prompt `chat()` would build). `thinking`
    (learn or mask) matters for glm4-0414 only: whether the final answer's thinking is learned.
    """
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("a training conversation must end with an assistant message")
    if mode in chat_template.TEMPLATE_MODES:
        return chat_template.encode_messages(tokenizer, messages, learn_all_turns, thinking)
    if mode == "glm":
        learn_all_turns = False
    pieces = _pieces(tokenizer, mode, messages, learn_all_turns)
    ids, learned = _encode(tokenizer, mode, pieces)
    prompt_ids = encode_context(tokenizer, mode, messages[:-1])
    labels = [i if flag else IGNORE_INDEX for i, flag in zip(ids, learned)]
    answer_start = (len(prompt_ids) if ids[:len(prompt_ids)] == prompt_ids
                    else chat_template.last_answer_start(learned))
    return ids, labels, answer_start


def template_length(tokenizer, mode: str) -> int:
    """Tokens of the shortest prompt: one empty user turn ([gMASK] <sop> for glm; [gMASK] sop and the round text
    "[Round 1]\\n\\n问：\\n\\n答：" for glm2; [gMASK] sop <|user|> "\\n" <|assistant|> for glm3; glm4 leaves the
    empty message out: [gMASK] <sop> <|assistant|>). A prompt limit at or below it leaves no room for the question."""
    return len(encode_context(tokenizer, mode, [{"role": "user", "content": ""}]))


def cut_at_stop(tokenizer, mode: str, new_ids: list[int], keep_stop: bool = False) -> list[int]:
    """Generated ids up to the first stop token (batched generation pads the rows that stopped early); with
    `keep_stop` the stop token stays, so that `decode_response` still sees that the answer ended there."""
    stops = set(stop_token_ids(tokenizer, mode))
    end = next((i for i, token in enumerate(new_ids) if token in stops), None)
    return list(new_ids) if end is None else list(new_ids[:end + 1 if keep_stop else end])


def decode_response(tokenizer, mode: str, new_ids: list[int], history=None):
    """What the official chat() returns for generated ids: cut at the first stop token, decoded and
    post-processed. glm/glm2: the text; glm3/glm4: (content, history).

    When generation stopped at max_new_tokens / max_length rather than on a stop token, every generated id is a
    real token of the answer and all are kept. (THUDM's ChatGLM3 chat() always drops the last generated token,
    assuming it is a stop token, and so loses a real one in that case; we deliberately do not.) A tool call that
    the limit cut is then marked incomplete (see `process_response`)."""
    ids = cut_at_stop(tokenizer, mode, new_ids)
    ended = len(ids) < len(new_ids)
    text = _glm3_decode(tokenizer, ids) if mode == "glm3" else tokenizer.decode(ids)
    return process_response(mode, text, history, ended=ended)


def _glm3_decode(tokenizer, ids: list[int]) -> str:
    """Generated glm3 ids as text, each message piece decoded on its own, as `_pieces` encodes them: the model writes
    encode_text("{metadata}\n") then encode_text(content) per message, <|assistant|> between the calls of a turn, and
    each encode_text starts with sentencepiece's dummy-prefix "▁". Decoded in one go, that "▁" of the content and of
    a second call's name would become a space (" ```python", " read_fault_codes": THUDM's chat() keeps them so), and
    the history chat() returns would no longer encode as the training data of the same conversation does."""
    assistant, newline = special(tokenizer, "<|assistant|>"), tokenizer.convert_tokens_to_ids("<0x0A>")
    parts, part = [], []
    for token in ids:
        if token == assistant:
            parts.append(part)
            part = []
        else:
            part.append(token)
    texts = []
    for part in parts + [part]:
        if newline in part:  # the name line (the byte piece <0x0A> ends it), then the content
            cut = part.index(newline)
            texts.append(tokenizer.decode(part[:cut]) + "\n" + tokenizer.decode(part[cut + 1:]))
        else:
            texts.append(tokenizer.decode(part))
    return "<|assistant|>".join(texts)


# ------------------------------------------------------------------------------------------------------------------
# a tool call's arguments
# ------------------------------------------------------------------------------------------------------------------
# ChatGLM3 writes a call's arguments as Python in a code block, "```python\ntool_call(system='发动机')\n```"
# (ChatGLM3's PROMPT.md and finetune demo; chatglm3-6b's process_response evaluates the code between the fences with a
# `tool_call(**kwargs)` that returns its keyword arguments). GLM-4 writes them as a JSON object (GLM-4-9B-Chat's
# process_response json.loads them).
GLM3_CALL_PREFIX, GLM3_CALL_SUFFIX = "```python\n", "\n```"


def glm3_call_arguments(text: str):
    """The keyword arguments of ChatGLM3's `tool_call(key=value, ...)` (in its code block or bare) as a dict, or None
    when the text is not one such call with literal values. It reads what chatglm3-6b's process_response evaluates,
    without running anything; values that are not JSON values (sets, bytes, ...) count as unreadable."""
    text = text.strip()
    if text.startswith(GLM3_CALL_PREFIX) and text.endswith(GLM3_CALL_SUFFIX):
        text = text[len(GLM3_CALL_PREFIX):-len(GLM3_CALL_SUFFIX)]
    try:
        call = ast.parse(text.strip(), mode="eval").body
        if not isinstance(call, ast.Call) or call.args or not isinstance(call.func, ast.Name) \
                or call.func.id != "tool_call" or any(keyword.arg is None for keyword in call.keywords):
            return None
        arguments = {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords}
        json.dumps(arguments)  # a value JSON cannot hold (a set, bytes) is not a tool argument
        return arguments
    except (SyntaxError, ValueError, TypeError, RecursionError):
        return None


def call_arguments(mode: str, content):
    """A tool call's arguments as a dict, or None when they are not written as the mode's model writes them: the
    one reading of a call's argument text, used by chat() ("parameters"), predict.py's terminal chat and the
    tool-call metrics. glm3: ChatGLM3's `tool_call(...)` form (`glm3_call_arguments`); glm4 (and any other mode): a
    JSON object. Blank text is a call without arguments ({}); a dict is taken as it is."""
    if isinstance(content, dict):
        return content
    if not isinstance(content, str):
        return None
    if not content.strip():
        return {}
    return glm3_call_arguments(content) if mode == "glm3" else json_arguments(content)


def json_arguments(text: str):
    """Arguments given as JSON text (GLM-4's form, and the training data's in both modes) as a dict: blank is {},
    anything but a JSON object None."""
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def process_response(mode: str, response: str, history=None, ended: bool = True):
    """The official post-processing of a decoded answer. glm/glm2: the text; glm3/glm4: (content, history).

    glm3/glm4 as the official chat() of ChatGLM3 / GLM-4: the generation is split at every <|assistant|> (the model
    writes one between the calls of one turn, as training on consecutive call messages teaches it), each part is one
    assistant message in the history, and a part whose first line (the metadata) is not blank is a tool call
    {"name": metadata, "content": the arguments}. The official code then returns the LAST part only, which drops all
    but the last of several parallel calls; here a turn with two or more calls returns the list of its calls in order
    ([{"name", "content"}, ...]); one call returns the dict as before, a text answer the text.

    A call is {"name": metadata, "content": the argument text as generated} and, when that text reads as the mode's
    call form (`call_arguments`: glm3 ChatGLM3's tool_call(...), glm4 a JSON object), also "parameters": the
    arguments as a dict, the key under which the official chat() of both returns them when the conversation
    declares tools. (The official code then drops "content", and raises on arguments it cannot read; we keep the
    text, so that a call that does not parse is still returned, without "parameters".)

    `ended` False: generation stopped at the token limit (or was stopped), not on a stop token. A call the limit cut
    (its name line unfinished, where the conversation declares tools; or its arguments blank or not readable) is then
    returned with "incomplete": True and never "parameters", and its history message carries "incomplete": True
    too; the calls before it are complete.
    (The official code would return the cut name as text, or a cut glm4 call as a call without arguments.)"""
    if mode in ("glm", "glm2"):
        response = response.strip().replace("[[训练时间]]", "2023年")
        if mode == "glm":
            for ascii_punct, full_width in ((",", "，"), ("!", "！"), (":", "："), (";", "；"), (r"\?", "？")):
                response = re.sub(r"([\u4e00-\u9fff])%s" % ascii_punct, r"\1%s" % full_width, response)
                response = re.sub(r"%s([\u4e00-\u9fff])" % ascii_punct, r"%s\1" % full_width, response)
        return response
    history = list(history or [])
    if mode in glm4_moe.MODES:  # <tool_call>NAME<arg_key>..</arg_key><arg_value>..</arg_value></tool_call>
        return _moe_response(response, history)
    thinking = ""
    if mode == chat_template.MODE_NAME:  # GLM-Z1: the thinking before </think> is shown apart, never scored
        thinking, response = chat_template.split_thinking(response)
    declares_tools = any(isinstance(m, dict) and m.get("role") == "system" and m.get("tools") for m in history)
    content, calls = "", []
    parts = response.split("<|assistant|>")
    for index, part in enumerate(parts):
        cut = not ended and index == len(parts) - 1
        if "\n" in part:
            metadata, content = part.split("\n", maxsplit=1)
        elif cut and declares_tools and part.strip():
            # With tools, a text answer starts with its (blank) name line: this is the name of a call being written.
            # (Without tools the text of a model that skipped that line stays text, as the official code keeps it.)
            metadata, content = part, ""
        else:
            metadata, content = "", part
        if not metadata.strip():
            content = content.strip()
            history.append({"role": "assistant", "metadata": metadata, "content": content})
            content = content.replace("[[训练时间]]", "2023年")
            continue
        message = {"role": "assistant", "metadata": metadata, "content": content}
        parameters = call_arguments(mode, content)
        content = {"name": metadata.strip(), "content": content}
        if cut and (parameters is None or not content["content"].strip()):
            content["incomplete"] = message["incomplete"] = True
        elif parameters is not None:
            content["parameters"] = parameters
        history.append(message)
        calls.append(content)
    if thinking and history:  # on the first message of this answer
        history[-len(parts)]["reasoning_content"] = thinking
    return (calls if len(calls) > 1 else content), history


def is_incomplete(call) -> bool:
    """A tool call that the token limit cut (see `process_response`): shown as such, never run, scored as wrong."""
    return isinstance(call, dict) and bool(call.get("incomplete"))


def _moe_response(response: str, history: list[dict]):
    """process_response for the GLM-4.5 format: the thinking apart (history's reasoning_content), the calls as
    {"name", "content", "parameters"} (a list when several) and as `metadata` call messages in the history."""
    thinking, response = chat_template.split_thinking(response)
    text, calls = glm4_moe.parse_calls(response)
    start = len(history)
    if text or not calls:
        history.append({"role": "assistant", "metadata": "", "content": text})
    for call in calls:
        arguments = json.dumps(call["parameters"], ensure_ascii=False)
        history.append({"role": "assistant", "metadata": call["name"], "content": arguments})
        call["content"] = arguments
    if thinking:
        history[start]["reasoning_content"] = thinking
    if not calls:
        return text, history
    return (calls if len(calls) > 1 else calls[0]), history
