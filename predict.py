"""Answer with a ChatGLM checkpoint: chat in the terminal, answer one query, or predict and score a test file.

The checkpoint is anything train.py saves (a full model, a LoRA adapter or a P-Tuning prefix; the base model comes
import python_check  # noqa: F401  first: refuses a Python older than 3.10 in one line
from --base_model_path or from the checkpoint's training_args.json), a merge_lora.py output, or an official model.
A training run's output_dir/latest links to its newest checkpoint; output_dir/epoch-E-step-S names any of them.

    # chat in the terminal (streams the answer; `clear` forgets the conversation, `exit` quits)
    python predict.py --mode glm3 --model_path output-glm3/latest

    # one answer on stdout
    python predict.py --mode glm3 --model_path output-glm3/latest --query "发动机水温高怎么办？"

    # batch prediction over a test file in the training format, with metrics
    python predict.py --mode glm3 --model_path output-glm3/latest \\
        --test_path data/test.jsonl --output_path output-glm3/test.predictions.jsonl --batch_size 8

    # chat with tools (glm3, glm4): a call shows as name + arguments, then you give the tool's result
    python predict.py --mode glm4 --model_path output-glm4/latest --tools tools.json

Batch prediction writes one JSON line per sample {"prompt", "reference", "prediction"} (in the order of the test
file; reference and prediction both post-processed as the official chat() post-processes an answer, so that they
compare alike) to --output_path, and the metrics (exact match, triple precision/recall/F1, BLEU-4, ROUGE-1/2/L; see
metrics.py) to <output stem>.metrics.json beside it; both appear only once complete. The prompt is built exactly as
in training: query = instruction + input, after the sample's history (or a `conversations` list whose last assistant
message is the reference). In a glm3/glm4 conversation with tools (a system message with `tools`, or a call), every
assistant turn is predicted from the reference history before it (only the last with --last_turn_only), several
calls in a row being one turn, and the metrics add the tool-call scores of metrics.py (call decision, name, argument
validity / exact match / key-value F1, call-set and parallel-call precision/recall); each line then also carries
"where" (file:line) and "turn" (the index of the turn's first message in the conversation).

chat() returns a text answer as text, one tool call as {"name", "content"} (the arguments as the model wrote them:
JSON for glm4, ChatGLM3's "```python\ntool_call(key=value)\n```" for glm3) plus "parameters" (the arguments as a
dict) when they read as that form, and the calls of one turn (the model writes them in one generation, <|assistant|>
between them) as a list of such dicts. A call cut by --max_new_tokens comes after the complete ones, marked
"incomplete": true (never "parameters"); the terminal chat shows it as incomplete and asks no result for it, the
tool-call metrics count it as wrong. The terminal chat shows a call's arguments as JSON ("parameters"), --query
prints the call as JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch

import quantization
from metrics import as_calls, compute_metrics, tool_call_metrics
from model.config import resolve_mode
from model import MODE, template
from model.export import atomic_write_text
from model.textfile import read_text
from dataset import DataError, read_records, sample_to_messages
from inference import CheckpointError, load_for_inference
from utils import PRECISIONS, HelpFormatter, add_bool_flag, setup_logging

logger = logging.getLogger("chatglm")


def add_sampling_flags(group, not_sampling: str) -> None:
    """--max_new_tokens, --do_sample, --top_p, --temperature: the generation flags of predict.py and web_demo.py (both
    check their ranges with check_generation_flags: the page's sliders span the same limits)."""
    group.add_argument("--max_new_tokens", type=int, default=512,
                       help=f"longest answer in tokens, 1 to {MAX_NEW_TOKENS} (the page's limit too)")
    add_bool_flag(group, "--do_sample", f"sample with --top_p / --temperature; False: {not_sampling}")
    group.add_argument("--top_p", type=float, default=0.8, help="nucleus sampling mass in (0, 1] (when sampling)")
    group.add_argument("--temperature", type=float, default=0.8,
                       help=f"sampling temperature in (0, {MAX_TEMPERATURE:g}] (when sampling)")


def add_model_flags(parser) -> None:
    """The flags that choose and load the checkpoint (predict.py and web_demo.py load it alike)."""
    group = parser.add_argument_group("model")
    group.add_argument("--mode", default=None, choices=sorted(MODE),
                       help="GLM version: glm, glm2, glm3, glm4 or glm4-0414 (GLM-4-0414 / GLM-Z1; default: read "
                            "from the checkpoint's config.json, logged)")
    group.add_argument("--model_path", required=True,
                       help="checkpoint directory: full model, LoRA adapter or P-Tuning prefix")
    group.add_argument("--base_model_path", default=None,
                       help="base model under a LoRA adapter / P-Tuning prefix (default: from training_args.json)")
    group.add_argument("--device", default=None,
                       help="cpu, or a GPU index (0, 1, ...) / cuda:N (default: GPU 0 if there is one, else cpu)")
    group.add_argument("--dtype", default="auto", choices=PRECISIONS,
                       help="auto: fp32 on the CPU, bf16 on a GPU that supports it, else fp16")
    quantization.add_flag(group, "an adapter or prefix on top stays in full precision (low-memory inference); 0: "
                                 "full precision; default: a LoRA adapter on the base quantized as it was trained "
                                 "(training_args.json), anything else unquantized", off=True)


def load_model(args):
    """(model, tokenizer) from the flags add_model_flags defines (inference.load_for_inference); CheckpointError with
    one line where they cannot be loaded."""
    return load_for_inference(args.mode, args.model_path, args.base_model_path, args.device, args.dtype,
                              args.quantization_bit)


# The generation settings' limits, one place for predict.py and web_demo.py (whose sliders span them): an answer of
# at most 8192 new tokens, a sampling temperature in (0, 2], top_p in (0, 1].
MAX_NEW_TOKENS = 8192
MAX_TEMPERATURE = 2.0
EPILOG = ("Every flag with its default and choices: docs/cli/predict.md. The guide: docs/inference.md (tool calls: "
          "docs/tools.md).")


def check_generation_flags(parser, args) -> None:
    """--max_new_tokens, --top_p and --temperature within the limits above (the page's too), in one line each."""
    if not 1 <= args.max_new_tokens <= MAX_NEW_TOKENS:
        parser.error(f"--max_new_tokens must be in [1, {MAX_NEW_TOKENS}], got {args.max_new_tokens}")
    if not 0 < args.top_p <= 1:
        parser.error(f"--top_p must be in (0, 1], got {args.top_p}")
    if not 0 < args.temperature <= MAX_TEMPERATURE:
        parser.error(f"--temperature must be in (0, {MAX_TEMPERATURE}], got {args.temperature}")


def build_parser() -> argparse.ArgumentParser:
    """predict.py's flags (docs/cli/generate.py writes docs/cli/predict.md from them); parse_args checks the values."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, epilog=EPILOG)
    add_model_flags(parser)

    group = parser.add_argument_group("what to answer (default: chat in the terminal)")
    group.add_argument("--query", default=None, help="answer this one query on stdout and exit")
    group.add_argument("--test_path", default=None,
                       help="test file (JSONL or JSON array, training format) to predict and score")
    group.add_argument("--output_path", default=None, help="with --test_path: the predictions, one JSON a line")
    add_bool_flag(group, "--overwrite", "replace an existing --output_path")
    group.add_argument("--batch_size", type=int, default=8, help="with --test_path: prompts generated together")
    add_bool_flag(group, "--last_turn_only", "with --test_path: in conversations with tools, predict only the last "
                                             "assistant turn rather than every one (each from the reference history "
                                             "before it)")

    group = parser.add_argument_group("tools (glm3, glm4)")
    group.add_argument("--tools", default=None,
                       help="JSON file with the tool list, as the data's system message carries it: [{\"type\": "
                            "\"function\", \"function\": {\"name\", \"description\", \"parameters\"}}, ...]; "
                            "the chat then shows each call and asks for the tool's result; --query prints a call as "
                            "JSON")
    group.add_argument("--system", default="",
                       help="the system prompt of the chat / --query: the content of the system message that starts "
                            "the conversation (and carries --tools, if given), put in the mode's template as training "
                            "puts the data's system messages (give what they say; default: none)")

    group = parser.add_argument_group("generation")
    add_sampling_flags(group, not_sampling="greedy (or beam) search")
    group.add_argument("--num_beams", type=int, default=1,
                       help="beam search width (1: none); the terminal chat then prints each answer whole, since "
                            "beam search cannot stream")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    resolve_mode(parser, args, "model_path")

    if args.query is not None and args.test_path:
        parser.error("--query and --test_path exclude each other")
    if bool(args.test_path) != bool(args.output_path):
        parser.error("--test_path and --output_path go together")
    for flag in ("batch_size", "num_beams"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    check_generation_flags(parser, args)
    if args.tools is not None and args.mode not in template.MESSAGE_MODES:
        parser.error(f"--tools needs --mode glm3 or glm4 (--mode {args.mode} has no tool calls)")
    if args.tools is not None and args.test_path:
        parser.error("--tools and --test_path exclude each other (test samples declare their tools themselves)")
    if args.system and args.test_path:
        parser.error("--system and --test_path exclude each other (test samples carry their own system messages)")
    if args.query is not None and not is_utf8(args.query):
        parser.error("--query is not UTF-8 text (set the terminal to UTF-8)")
    return args


def is_utf8(text: str) -> bool:
    """False for text Python decoded with surrogate escapes: bytes of another encoding (e.g. GBK) from the terminal
    or argv, which the tokenizer cannot take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def load_tools(path: str) -> list[dict]:
    """The tool list of --tools, checked: a JSON list of {"type": "function", "function": {"name": ...}}."""
    try:
        tools = json.loads(read_text(path, DataError))  # the reading rule of every file (a byte-order mark dropped)
    except DataError as e:  # cannot be read, or not UTF-8
        raise DataError(f"--tools {e}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"--tools {path}: not a JSON file ({e})") from None
    problem = tool_list_problem(tools)
    if problem:
        raise DataError(f"--tools {path}: {problem}")
    return tools


def tool_list_problem(tools) -> str | None:
    """What is wrong with a tool list (--tools, the page's tools box), or None: it must be a non-empty JSON list of
    {"type": "function", "function": {"name": ...}}, as the training data's system messages carry it."""
    if not isinstance(tools, list) or not tools:
        return f"expected a non-empty JSON list of tools, got {type(tools).__name__}"
    for number, tool in enumerate(tools, start=1):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or tool.get("type") != "function" \
                or not isinstance(function.get("name"), str) or not function["name"].strip():
            return (f"tool {number} is not {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}: "
                    f"{json.dumps(tool, ensure_ascii=False)[:80]}")
    return None


def tool_names(tools) -> list[str]:
    return [tool["function"]["name"] for tool in tools or []]


def generation_kwargs(args, tokenizer, mode: str) -> dict:
    kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample, "num_beams": args.num_beams,
              "eos_token_id": template.stop_token_ids(tokenizer, mode), "pad_token_id": tokenizer.pad_token_id}
    if args.do_sample:
        kwargs.update(top_p=args.top_p, temperature=args.temperature)
    else:  # no sampling settings, so generate() does not warn that they are unused
        kwargs.update(top_p=None, temperature=None, top_k=None)
    return kwargs


def answer_text(response) -> str:
    """A glm3/glm4 tool call comes back from process_response as {"name", "content", "parameters"} (the last where
    the arguments read; several calls of one turn as a list of them): score it as JSON text."""
    return response if isinstance(response, str) else json.dumps(response, ensure_ascii=False)


def reference_response(tokenizer, mode: str, messages: list[dict], start: int | None = None):
    """The reference (messages[start:], the final assistant turn: one message, or several calls in a row) as chat()
    would return it had the model generated exactly the tokens training teaches for it: encoded by the template, then
    decoded and post-processed like every prediction (glm: ASCII punctuation beside Chinese becomes full-width;
    glm3/glm4: a tool call becomes {"name", "content"}, several a list of them; all: the official stripping). So a
    prediction identical token for token to the reference scores as equal."""
    start = len(messages) - 1 if start is None else start
    ids, _, answer_start = template.encode_messages(tokenizer, mode, messages, learn_all_turns=False)
    prompt = template.encode_context(tokenizer, mode, messages[:start])
    if ids[:len(prompt)] == prompt:
        answer_start = len(prompt)
    return decode_response_of(tokenizer, mode, ids[answer_start:], messages[:start])


def reference_answer(tokenizer, mode: str, messages: list[dict]) -> str:
    """The final assistant message as text, see `reference_response`."""
    return answer_text(reference_response(tokenizer, mode, messages))


# ------------------------------------------------------------------------------------------------------------------
# batch prediction
# ------------------------------------------------------------------------------------------------------------------
def has_tools(messages: list[dict]) -> bool:
    """A conversation that declares tools or calls one."""
    return any((m["role"] == "system" and m.get("tools")) or m["role"] == "observation"
               or (m["role"] == "assistant" and str(m.get("metadata") or "").strip()) for m in messages)


def answer_turns(messages: list[dict]) -> list[int]:
    """Where each assistant turn starts: a run of consecutive assistant messages is ONE turn (the calls of one turn
    are consecutive assistant messages, which the model writes in one generation, <|assistant|> between them)."""
    return [i for i, m in enumerate(messages) if m["role"] == "assistant" and (i == 0 or messages[i - 1]["role"]
                                                                               != "assistant")]


def read_test_set(path: str, mode: str, last_turn_only: bool = False) -> list[dict]:
    """Every answer to predict as {"query", "role", "history", "reference", "messages", "start", "where", "turn"}:
    the last assistant message of a sample; in a glm3/glm4 conversation with tools every assistant turn (or only
    the last with `last_turn_only`), each given the reference history before it. `messages` ends with the answer,
    which starts at messages[start]. Any bad line fails here, before generation."""
    samples = []
    for number, record in read_records(path):
        where = f"{path}:{number}"
        messages = sample_to_messages(mode, record, where)
        tools = mode in template.MESSAGE_MODES and has_tools(messages)
        starts = answer_turns(messages) if tools else [len(messages) - 1]
        for start in starts[-1:] if last_turn_only or not tools else starts:
            end = next((i for i in range(start, len(messages)) if messages[i]["role"] != "assistant"), len(messages))
            prompt_messages = messages[:start]
            if not prompt_messages:
                raise DataError(f"{where}: nothing to answer before the reference (the conversation is one answer)")
            last = prompt_messages[-1]
            if last["role"] == "assistant" or (mode not in template.MESSAGE_MODES and last["role"] != "user"):
                raise DataError(f"{where}: the message before the reference must come from the user, "
                                f"not {last['role']!r}")
            if tools and last["role"] not in ("user", "observation"):
                raise DataError(f"{where}: the message before assistant turn {start + 1} must be a user turn or "
                                f"a tool's observation, not {last['role']!r}")
            samples.append({"query": last["content"], "role": last["role"], "history": prompt_messages[:-1],
                            "reference": messages[end - 1]["content"], "messages": messages[:end], "start": start,
                            "where": where, "turn": start if tools else None})
    if not samples:
        raise DataError(f"{path}: no samples")
    return samples


def generate_batch(model, tokenizer, mode: str, prompts: list[list[int]], gen_kwargs: dict) -> list[list[int]]:
    """New token ids of each prompt, generated together with LEFT padding, cut after the first stop token (which
    stays: it tells an answer that ended from one that the token limit cut, see template.decode_response)."""
    batch = tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt")
    if tokenizer.padding_side != "left":
        raise RuntimeError(f"{type(tokenizer).__name__} pads on the {tokenizer.padding_side}; generation needs left")
    device = next(model.parameters()).device
    input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    with torch.inference_mode():
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, **gen_kwargs)
    new_ids = output[:, input_ids.shape[1]:].tolist()
    return [template.cut_at_stop(tokenizer, mode, row, keep_stop=True) for row in new_ids]


def decode_response_of(tokenizer, mode: str, new_ids: list[int], history):
    """The response as chat() returns it (the official post-processing of each version): text, or for glm3/glm4 a
    tool call {"name", "content"} or a list of them."""
    if mode in template.MESSAGE_MODES:
        response, _ = template.decode_response(tokenizer, mode, new_ids, list(history))
        return response
    return template.decode_response(tokenizer, mode, new_ids)


def decode_answer(tokenizer, mode: str, new_ids: list[int], history) -> str:
    """The answer text as chat() returns it (a tool call as JSON text)."""
    return answer_text(decode_response_of(tokenizer, mode, new_ids, history))


def metrics_path_for(output_path: str) -> str:
    root, _ = os.path.splitext(output_path)
    return root + ".metrics.json"


def check_outputs(args) -> None:
    for path in (args.output_path, metrics_path_for(args.output_path)):
        if os.path.isdir(path):
            raise DataError(f"--output_path: {path} is a directory")
        if os.path.exists(path) and not args.overwrite:
            raise DataError(f"--output_path: {path} exists; pass --overwrite to replace it")
    directory = os.path.dirname(os.path.abspath(args.output_path))
    os.makedirs(directory, exist_ok=True)


def predict_file(args, model, tokenizer, samples: list[dict]) -> dict:
    from tqdm import tqdm

    mode = args.mode
    gen_kwargs = generation_kwargs(args, tokenizer, mode)
    prompts = [template.encode_prompt(tokenizer, mode, s["query"], s["history"], s["role"]) for s in samples]
    # Longest first, so that a batch holds prompts of similar length (little padding) and memory peaks at once.
    order = sorted(range(len(samples)), key=lambda i: -len(prompts[i]))
    responses = [None] * len(samples)
    with tqdm(total=len(samples), desc="predict", unit="sample", dynamic_ncols=True) as progress:
        for start in range(0, len(order), args.batch_size):
            indices = order[start:start + args.batch_size]
            new_ids = generate_batch(model, tokenizer, mode, [prompts[i] for i in indices], gen_kwargs)
            for index, ids in zip(indices, new_ids):
                history = samples[index]["history"] + [{"role": samples[index]["role"],
                                                        "content": samples[index]["query"]}]
                responses[index] = decode_response_of(tokenizer, mode, ids, history)
            progress.update(len(indices))

    gold = [reference_response(tokenizer, mode, s["messages"], s["start"]) for s in samples]
    predictions, references = [answer_text(r) for r in responses], [answer_text(r) for r in gold]  # alike
    metrics = compute_metrics(predictions, references)
    if any(s["turn"] is not None for s in samples):  # conversations with tools: the tool-call metrics too
        metrics.update(tool_call_metrics(responses, gold, mode))
    lines = []
    for s, r, p in zip(samples, references, predictions):
        line = {"prompt": s["query"], "reference": r, "prediction": p}
        if s["turn"] is not None:  # which conversation and which of its assistant turns
            line.update(where=s["where"], turn=s["turn"])
        lines.append(json.dumps(line, ensure_ascii=False))
    metrics_path = metrics_path_for(args.output_path)
    atomic_write_text(metrics_path, json.dumps(metrics, ensure_ascii=False, indent=2) + "\n")
    atomic_write_text(args.output_path, "\n".join(lines) + "\n")
    logger.info("wrote %d predictions to %s and metrics to %s", len(lines), args.output_path, metrics_path)
    return metrics


# ------------------------------------------------------------------------------------------------------------------
# chat
# ------------------------------------------------------------------------------------------------------------------
WELCOME = "欢迎使用 ChatGLM：输入内容即可对话，输入 clear 清空对话历史，输入 exit 退出程序。"
TOOLS_WELCOME = ("可用工具：{names}。模型调用工具时会显示工具名和参数，并请你输入工具的结果"
                 "（直接输入，或输入 @文件路径 从文件读取）。")


def chat_start(tools, system: str = "") -> list[dict]:
    """The history a chat starts from: one system message with the --system prompt and the tools (as the training
    data's system messages carry them), or none when there is neither."""
    if tools:
        return [{"role": "system", "content": system, "tools": tools}]
    return [{"role": "system", "content": system}] if system else []


def shown_text(response, names):
    """What the terminal shows of an answer so far: None while it is a tool call or, with tools, may still become
    one (it is a prefix of a tool name: a call writes the name first, and only the newline after it tells a call
    from a text answer)."""
    if names is None:
        return answer_text(response)
    if not isinstance(response, str) or any(name.startswith(response) for name in names):
        return None
    return response


def chat_turn(model, tokenizer, query: str, history, role: str, gen_kwargs: dict, stdout, names=None):
    """Answer one query (streamed, unless beam search), printing text as it comes; returns (response, history)."""
    stdout.write("\nChatGLM：")
    stdout.flush()
    if gen_kwargs.get("num_beams", 1) > 1:  # transformers cannot stream beam search: the answer comes whole
        response, history = model.chat(tokenizer, query, history=history, role=role, **gen_kwargs)
        text = shown_text(response, None if names is None else [])
        if text is not None:
            stdout.write(text + "\n")
            stdout.flush()
        return response, history
    printed = ""
    for response, history in model.stream_chat(tokenizer, query, history=history, role=role, **gen_kwargs):
        text = shown_text(response, names)
        if text is not None and text.startswith(printed):  # post-processing can rewrite earlier characters
            stdout.write(text[len(printed):])
            stdout.flush()
            printed = text
    text = shown_text(response, None if names is None else [])
    if text is not None and text != printed:
        stdout.write(f"\nChatGLM：{text}" if printed else text)
    if text is not None or printed:
        stdout.write("\n")
    stdout.flush()
    return response, history


def shown_arguments(call: dict) -> str:
    """A call's arguments as the terminal shows them: as JSON when chat() could read them ("parameters": glm3's
    tool_call(...) form and glm4's JSON alike), else the text the model wrote."""
    if "parameters" in call:
        return json.dumps(call["parameters"], ensure_ascii=False)
    return str(call["content"]).strip()


INCOMPLETE_CALL = "（不完整：回答达到 --max_new_tokens 上限被截断，未调用）"
INCOMPLETE_NOTE = ("工具调用不完整，不执行；请调大 --max_new_tokens 后重新提问 (a tool call was cut by --max_new_tokens; "
                   "it is not run: ask again with a larger --max_new_tokens)\n")
CLEARED = "对话历史已清空。\n"


class Command(str):
    """A chat command typed at any prompt (`clear`, `exit`), as opposed to text for the model."""


def read_typed(stdin) -> str | None:
    """One line typed at a prompt, stripped: a `Command` for `clear` / `exit`; None at end of input (Ctrl-D)."""
    line = stdin.readline()
    if not line:
        return None
    text = line.strip()
    return Command(text) if text in ("clear", "exit") else text


def read_observation(call: dict, stdin, stdout, which: str = "") -> str | None:
    """The result of one tool call, typed on one line or read from the file named after @ (so a result that reads
    `clear` or `exit` can be given from a file); a `Command` for `clear` / `exit`; None at end of input. `which`
    tells the calls of one turn apart ("（调用 1/2）")."""
    while True:
        stdout.write(f"工具 {call['name']} 的结果{which}：")
        stdout.flush()
        text = read_typed(stdin)
        if text is None or isinstance(text, Command):
            return text
        if text.startswith("@"):
            path = text[1:].strip()
            try:
                return read_text(path).strip()  # the reading rule of every file: a byte-order mark is not the result
            except ValueError as e:  # cannot be read, or not UTF-8: the message names the file
                stdout.write(f"无法读取 {path} ({e})\n")
                continue
        if text and is_utf8(text):
            return text
        stdout.write("请输入工具的结果，或 @文件路径 (type the tool's result, or @FILE to read it from a file)\n")


def show_calls(calls: list[dict], stdout) -> bool:
    """Print the calls of a turn; False when one is incomplete (cut by --max_new_tokens: shown so, nothing run)."""
    for call in calls:
        if template.is_incomplete(call):
            stdout.write(f"调用工具 {call['name']}{INCOMPLETE_CALL}，参数：{str(call['content']).strip()}\n")
        else:
            stdout.write(f"调用工具 {call['name']}，参数：{shown_arguments(call)}\n")
    if any(map(template.is_incomplete, calls)):
        stdout.write(INCOMPLETE_NOTE)
        return False
    return True


def chat_loop(model, tokenizer, gen_kwargs: dict, stdin=None, stdout=None, tools=None, system: str = "") -> None:
    """Read a query a line, stream the answer; `clear` resets the history, `exit` (or end of input) quits, at every
    prompt. With tools, a tool call is shown as its name and arguments and the tool's result is asked for (one per
    call, in order, for several calls in one turn); the model then continues from it, until it answers with text.
    The conversation starts with the --system prompt (and the tools), as the training data's system message."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    names = tool_names(tools) if tools else None
    history = chat_start(tools, system)
    stdout.write(WELCOME + "\n")
    if tools:
        stdout.write(TOOLS_WELCOME.format(names="、".join(names)) + "\n")
    while True:
        stdout.write("\n用户：")
        stdout.flush()
        query = read_typed(stdin)
        if query is None:  # end of input (Ctrl-D)
            stdout.write("\n")
            break
        if not query:
            continue
        if not is_utf8(query):  # the conversation so far stays
            stdout.write("输入不是 UTF-8 文本，请重新输入 (the input is not UTF-8 text; set the terminal to UTF-8)\n")
            continue
        if query == "exit":
            break
        if query == "clear":
            history = chat_start(tools, system)
            stdout.write(CLEARED)
            continue
        outcome, history = answer_with_tools(model, tokenizer, query, history, gen_kwargs, stdin, stdout, names)
        if outcome in ("exit", None):
            return
        if outcome == "clear":
            history = chat_start(tools, system)
            stdout.write(CLEARED)


def answer_with_tools(model, tokenizer, query: str, history, gen_kwargs: dict, stdin, stdout, names):
    """Answer a user query; with tools, ask for the result of each call and continue until a text answer (or an
    incomplete call). Returns (outcome, history): outcome "" when answered, a `Command` typed at a result prompt,
    None at end of input."""
    role = "user"
    while True:
        response, history = chat_turn(model, tokenizer, query, history, role, gen_kwargs, stdout, names)
        calls = as_calls(response)
        if names is None or calls is None or not show_calls(calls, stdout):
            return "", history
        results = []
        for number, call in enumerate(calls, start=1):
            which = f"（调用 {number}/{len(calls)}）" if len(calls) > 1 else ""
            result = read_observation(call, stdin, stdout, which)
            if result is None:  # end of input
                stdout.write("\n")
                return None, history
            if isinstance(result, Command):
                return result, history
            results.append(result)
        # the results come back as observations in the order of the calls; the last one is the new query
        history = history + [{"role": "observation", "content": result} for result in results[:-1]]
        query, role = results[-1], "observation"


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(rank=0)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        samples = None
        if args.test_path:  # every input problem shows before the model loads
            check_outputs(args)
            samples = read_test_set(args.test_path, args.mode, args.last_turn_only)
        tools = load_tools(args.tools) if args.tools is not None else None
        model, tokenizer = load_model(args)
    except (DataError, CheckpointError) as e:
        print(f"predict.py: error: {e}", file=sys.stderr)
        return 2

    if samples is not None:
        metrics = predict_file(args, model, tokenizer, samples)
        print(json.dumps(metrics, ensure_ascii=False, indent=2))
        return 0
    gen_kwargs = {k: v for k, v in generation_kwargs(args, tokenizer, args.mode).items()
                  if k not in ("eos_token_id", "pad_token_id")}  # chat() adds the stop tokens of the template
    if args.query is not None:
        response, _ = model.chat(tokenizer, args.query, history=chat_start(tools, args.system), **gen_kwargs)
        print(answer_text(response))
        return 0
    chat_loop(model, tokenizer, gen_kwargs, tools=tools, system=args.system)
    return 0


if __name__ == "__main__":
    from utils import keep_bitsandbytes_out
    command_line = parse_args()  # (main parses it again) what this process loads decides, before peft is imported
    keep_bitsandbytes_out(command_line.quantization_bit, command_line.model_path)
    sys.exit(main())
