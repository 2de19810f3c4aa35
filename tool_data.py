"""Tool calls in ChatGLM3 / GLM-4 conversations: the forms THUDM's demos write, converted to the one representation
`model/template.py` renders, and the checks that keep a sample from teaching a broken call.

The representation (what the template renders and what `chat()` puts into its history):
- a system message carries the tools: {"role": "system", "content": ..., "tools": [...]}; a sample may declare
  several tools, in one system message or several;
- a tool call is an assistant message {"role": "assistant", "metadata": <tool name>, "content": <arguments>};
- parallel calls are consecutive call messages, answered by as many consecutive observation messages in the same
  order: GLM-4's openai_api_server (basic_demo, `process_messages`) renders an OpenAI `tool_calls` list and the
  `tool` results after it exactly so, and ChatGLM3's format holds the same sequence;
- a tool's result is {"role": "observation", "content": ...}.

Also accepted, and converted to it (`conversation_messages`):
- "messages" instead of "conversations" (GLM-4's finetune_demo names the list so);
- OpenAI style, as GLM-4's openai_api_server takes it: an assistant message with `tool_calls`
  ([{"type": "function", "function": {"name": ..., "arguments": ...}}, ...]; a text content before the calls
  becomes an assistant message of its own) and `{"role": "tool", "content": ...}` results;
- ChatGLM3's finetune demo (finetune_chatmodel_demo, README "多轮对话格式"): a sample-level "tools" list (a system
  message first, for glm3 with ChatGLM3's tool system text, as the demo inserts it) and
  `{"role": "tool", "name": ..., "parameters": {...}, "observation": ...}` items, each a call and its result (the
  demo's per-turn "loss" flags are not read: assistant turns are learned as `--last_turn_only` says);
- GLM-4's finetune_demo README: a call written as assistant text '{"name": ..., "arguments": {...}}' without
  metadata, when the name is a declared tool (GLM-4-9B-Chat itself writes `<|assistant|>name\\n{arguments}`, which
  its chat() and openai_api_server parse; the README's form would teach a call they do not recognise).

Arguments may be a JSON object or a JSON string ("" means no arguments). They are written as each model writes them:
- glm4: `json.dumps(arguments, ensure_ascii=False)`, as glm_server.py's `process_response` (GLM-4 basic_demo)
  writes the arguments the model generated: `{"system": "发动机"}`, no arguments `{}`;
- glm3: a Python call in a code block, "```python\\ntool_call(system='发动机')\\n```": ChatGLM3's finetune demo
  (`format_function_call`) writes calls so, and chatglm3-6b's `process_response` evaluates that code to get the
  parameters back. A call already written in that form is kept as it is.

`check_calls` refuses (ValueError, one line) a call whose arguments are not a JSON object, a call to a tool the
sample does not declare, and an observation without a call to answer.
"""
from __future__ import annotations

import json
import keyword

# How each mode's model writes a call's arguments is read in one place, model/template.py (`call_arguments`, used by
# chat(), predict.py and the metrics); the checks here read them with the same functions.
from model.template import GLM3_CALL_PREFIX, GLM3_CALL_SUFFIX, glm3_call_arguments, json_arguments

# Tools a sample may call without declaring a function of that name: ChatGLM3's code interpreter (its system prompt
# describes it in text), and GLM-4's built-in tools, callable by their type once declared ({"type": "python"} ...).
GLM3_BUILTIN_TOOLS = ("interpreter",)
GLM4_BUILTIN_TOOLS = ("python", "simple_browser", "cogview")
# The system text ChatGLM3 puts before its tools (chatglm3-6b's PROMPT.md, "工具调用"; its finetune demo inserts it
# when a sample gives "tools" beside the conversation); the template appends the tools as JSON after a newline.
GLM3_TOOL_SYSTEM_TEXT = "Answer the following questions as best as you can. You have access to the following tools:"


class ToolDataError(ValueError):
    """A conversation the tool-call format cannot hold; the message is one line, without the file and line."""


# ------------------------------------------------------------------------------------------------------------------
# conversion
# ------------------------------------------------------------------------------------------------------------------
def conversation_messages(mode: str, sample: dict, check: bool = False) -> list[dict]:
    """The sample's "conversations" (or "messages") as template messages in the representation above. Raises
    ToolDataError for a turn of a form it does not know and, with `check`, for what `check_calls` refuses (naming
    the turn as the sample numbers it, from 1)."""
    messages, turns = converted_messages(mode, sample)
    if check:
        check_calls(mode, messages, turns)
    return messages


def converted_messages(mode: str, sample: dict) -> tuple[list[dict], list[int]]:
    """The converted messages, and for each the number of the sample's turn it comes from (0: the sample's tools)."""
    conversation = sample["conversations"] if "conversations" in sample else sample["messages"]
    key = "conversations" if "conversations" in sample else "messages"
    if not isinstance(conversation, list) or not conversation:
        raise ToolDataError(f"'{key}' must be a non-empty list")
    messages, turns = [], []
    if sample.get("tools") is not None:  # ChatGLM3's finetune demo: the tools beside the conversation
        text = GLM3_TOOL_SYSTEM_TEXT if mode == "glm3" else ""  # glm4's template writes its own tool prompt
        messages.append({"role": "system", "content": text, "tools": sample["tools"]})
        turns.append(0)
    for number, turn in enumerate(conversation, start=1):
        converted = _turn_messages(mode, turn, number)
        messages += converted
        turns += [number] * len(converted)
    declared = declared_tools(mode, messages)
    messages = [_written_call(mode, m, declared) if is_call(m) or _is_json_call(m, declared) else m
                for m in messages]
    return messages, turns


def _turn_messages(mode: str, turn, number: int) -> list[dict]:
    if not isinstance(turn, dict) or not isinstance(turn.get("role"), str):
        raise ToolDataError(f"turn {number}: every conversation turn needs a string 'role'")
    role = turn["role"]
    if role == "tool" and "name" in turn and "parameters" in turn:  # ChatGLM3 finetune demo: call + result
        observation = turn.get("observation")
        if not isinstance(observation, str):
            observation = json.dumps(observation, ensure_ascii=False)  # as the demo writes a non-string result
        return [{"role": "assistant", "metadata": turn["name"], "content": turn["parameters"]},
                {"role": "observation", "content": observation}]
    if role == "tool":  # an OpenAI tool result (its tool_call_id only pairs it with its call: the order does that)
        if not isinstance(turn.get("content"), str):
            raise ToolDataError(f"turn {number}: a 'tool' turn needs a string 'content' (a tool's result) or "
                                f"ChatGLM3's 'name' and 'parameters'")
        return [{"role": "observation", "content": turn["content"]}]
    if role == "assistant" and turn.get("tool_calls"):
        return _openai_calls(turn, number)
    content = turn.get("content")
    if role == "assistant" and turn.get("metadata") and not isinstance(content, str):
        return [{**turn, "role": role}]  # arguments given as a JSON object (check_calls names anything else)
    if not isinstance(content, str):
        raise ToolDataError(f"turn {number}: every conversation turn needs string 'role' and 'content'")
    return [{**turn, "role": role}]


def _openai_calls(turn: dict, number: int) -> list[dict]:
    calls = turn["tool_calls"]
    messages = []
    if turn.get("content"):  # text before the calls: an assistant message of its own, as the format holds it
        if not isinstance(turn["content"], str):
            raise ToolDataError(f"turn {number}: 'content' beside 'tool_calls' must be a string")
        messages.append({"role": "assistant", "content": turn["content"]})
    for call in calls if isinstance(calls, list) else [None]:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ToolDataError(f"turn {number}: every entry of 'tool_calls' must be {{\"type\": \"function\", "
                                f"\"function\": {{\"name\": ..., \"arguments\": ...}}}}")
        messages.append({"role": "assistant", "metadata": function["name"],
                         "content": function.get("arguments", "")})
    return messages


def is_call(message: dict) -> bool:
    """An assistant message that calls a tool: its metadata names the tool."""
    return message["role"] == "assistant" and bool(str(message.get("metadata") or "").strip())


def _is_json_call(message: dict, declared: set[str] | None) -> bool:
    """GLM-4 finetune_demo's README form: assistant text {"name": <declared tool>, "arguments": {...}}."""
    if message["role"] != "assistant" or not declared or not message["content"].lstrip().startswith("{"):
        return False
    try:
        value = json.loads(message["content"])
    except json.JSONDecodeError:
        return False
    return isinstance(value, dict) and set(value) == {"name", "arguments"} and value["name"] in declared


def _written_call(mode: str, message: dict, declared) -> dict:
    """A call with its arguments written as the mode's model writes them (see the module docstring). Arguments that
    are not a JSON object stay as they are, for `check_calls` to name."""
    if not is_call(message):  # the README form
        value = json.loads(message["content"])
        message = {"role": "assistant", "metadata": value["name"], "content": value["arguments"]}
    name, arguments = message["metadata"].strip(), message["content"]
    if builtin(mode, name) or (mode == "glm3" and isinstance(arguments, str)
                               and arguments.startswith(GLM3_CALL_PREFIX)):
        return message  # code or a call already in ChatGLM3's own form
    parsed = arguments if isinstance(arguments, dict) else (
        json_arguments(arguments) if isinstance(arguments, str) else None)  # the data gives JSON in both modes
    if parsed is None:  # left for check_calls to name, as text
        return message if isinstance(arguments, str) else {
            **message, "content": json.dumps(arguments, ensure_ascii=False)}
    if mode == "glm3" and all(map(keyword_name, parsed)):
        return {**message, "content": glm3_call_text(parsed)}
    return {**message, "content": json.dumps(parsed, ensure_ascii=False)}


def keyword_name(key: str) -> bool:
    """A name ChatGLM3's tool_call(key=value) form can write: a Python identifier that is not a keyword."""
    return key.isidentifier() and not keyword.iskeyword(key)


def glm3_call_text(arguments: dict) -> str:
    """ChatGLM3's way of writing a call's arguments: keyword arguments of `tool_call` in a Python code block, each
    value a Python literal (JSON true/null are Python's True/None)."""
    keywords = ", ".join(f"{key}={value!r}" for key, value in arguments.items())
    return f"{GLM3_CALL_PREFIX}tool_call({keywords}){GLM3_CALL_SUFFIX}"


# ------------------------------------------------------------------------------------------------------------------
# checks
# ------------------------------------------------------------------------------------------------------------------
def builtin(mode: str, name: str) -> bool:
    return name in (GLM3_BUILTIN_TOOLS if mode == "glm3" else GLM4_BUILTIN_TOOLS)


def declared_tools(mode: str, messages: list[dict]) -> set[str] | None:
    """Names the sample's system messages declare: function names (OpenAI form {"type": "function", "function":
    {"name"}} or ChatGLM3's {"name": ...}) and the types of GLM-4's built-in tools. None when some tool has no name
    to read (ChatGLM3's demo leaves the tools' form free): calls are then not checked against the declaration."""
    names = set()
    for message in messages:
        if message["role"] != "system" or message.get("tools") is None:
            continue
        tools = message["tools"]
        for tool in tools if isinstance(tools, list) else [tools]:
            function = tool.get("function") if isinstance(tool, dict) else None
            name = function.get("name") if isinstance(function, dict) else (
                tool.get("name") if isinstance(tool, dict) else None)
            if isinstance(tool, dict) and tool.get("type") in GLM4_BUILTIN_TOOLS:
                name = tool["type"]
            if not isinstance(name, str):
                return None
            names.add(name)
    return names


def check_calls(mode: str, messages: list[dict], turns: list[int] | None = None) -> None:
    """Raise ToolDataError (one line, naming the turn: `turns[i]` for message i, else its position from 1) for a
    call to a tool the sample does not declare, a call whose arguments are not a JSON object (glm3: not ChatGLM3's
    `tool_call(...)` either), and an observation with no call left to answer."""
    declared = declared_tools(mode, messages)
    pending = 0  # calls not answered yet by an observation
    for index, message in enumerate(messages):
        number = turns[index] if turns else index + 1
        role = message["role"]
        if is_call(message):
            name = message["metadata"].strip()
            if mode == "glm3" and builtin(mode, name):
                pending += 1
                continue
            if declared is not None and name not in declared:
                listed = ", ".join(sorted(declared)) or "none"
                raise ToolDataError(f"turn {number} calls the tool {name!r}, which the sample does not declare "
                                    f"(its system messages' 'tools' declare: {listed})")
            if not builtin(mode, name):
                _check_arguments(mode, name, message["content"], number)
            pending += 1
        elif role == "observation":
            if not pending:
                raise ToolDataError(f"turn {number} is an observation without a tool call to answer (each "
                                    f"observation answers one call of the assistant turns before it, in order)")
            pending -= 1
        elif role in ("user", "system"):
            pending = 0


def _check_arguments(mode: str, name: str, content, number: int) -> None:
    if mode == "glm3" and isinstance(content, str) and content.startswith(GLM3_CALL_PREFIX):
        if glm3_call_arguments(content) is None:
            raise ToolDataError(f"turn {number}: the call to {name!r} is not ChatGLM3's tool_call(key=value, ...) "
                                f"with literal values: {content[:60]!r}")
        return
    try:
        value = json.loads(content)
    except json.JSONDecodeError as e:
        raise ToolDataError(f"turn {number}: the arguments of the call to {name!r} are not valid JSON ({e.msg} at "
                            f"column {e.colno}): {content[:60]!r}") from None
    if not isinstance(value, dict):
        raise ToolDataError(f"turn {number}: the arguments of the call to {name!r} must be a JSON object, got "
                            f"{content[:60]!r}")
    if mode == "glm3":  # only keys that cannot be Python keywords are left in JSON by the conversion
        bad = next(key for key in value if not keyword_name(key))
        raise ToolDataError(f"turn {number}: the call to {name!r} has the argument {bad!r}, which ChatGLM3's "
                            f"tool_call(key=value) form cannot write (not a Python identifier, or a Python keyword)")
