"""Answer with a ChatGLM checkpoint: chat in the terminal, answer one query, or predict and score a test file.

The checkpoint is anything train.py saves (a full model, a LoRA adapter or a P-Tuning prefix; the base model comes
from --base_model_path or from the checkpoint's training_args.json), a merge_lora.py output, or an official model.

    # chat in the terminal (streams the answer; `clear` forgets the conversation, `exit` quits)
    python predict.py --mode glm3 --model_path output-glm3/epoch-2-step-100

    # one answer on stdout
    python predict.py --mode glm3 --model_path output-glm3/epoch-2-step-100 --query "发动机水温高怎么办？"

    # batch prediction over a test file in the training format, with metrics
    python predict.py --mode glm3 --model_path output-glm3/epoch-2-step-100 \\
        --test_path data/test.jsonl --output_path output-glm3/test.predictions.jsonl --batch_size 8

Batch prediction writes one JSON line per sample {"prompt", "reference", "prediction"} (in the order of the test
file; reference and prediction both post-processed as the official chat() post-processes an answer, so that they
compare alike) to --output_path, and the metrics (exact match, triple precision/recall/F1, BLEU-4, ROUGE-1/2/L; see
metrics.py) to <output stem>.metrics.json beside it; both appear only once complete. The prompt is built exactly as
in training: query = instruction + input, after the sample's history (or a `conversations` list whose last assistant
message is the reference).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch

import quantization
from metrics import compute_metrics
from model import MODE, template
from model.export import atomic_write_text
from dataset import DataError, read_records, sample_to_messages
from inference import CheckpointError, load_for_inference
from utils import PRECISIONS, add_bool_flag, setup_logging

logger = logging.getLogger("chatglm")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("model")
    group.add_argument("--mode", required=True, choices=sorted(MODE), help="ChatGLM version: glm, glm2, glm3 or glm4")
    group.add_argument("--model_path", required=True,
                       help="checkpoint directory: full model, LoRA adapter or P-Tuning prefix")
    group.add_argument("--base_model_path", default=None,
                       help="base model under a LoRA adapter / P-Tuning prefix (default: from training_args.json)")
    group.add_argument("--device", default=None,
                       help="cpu, or a GPU index (0, 1, ...) / cuda:N (default: GPU 0 if there is one, else cpu)")
    group.add_argument("--dtype", default="auto", choices=PRECISIONS,
                       help="auto: fp32 on the CPU, bf16 on a GPU that supports it, else fp16")
    quantization.add_flag(group, "an adapter or prefix on top stays in full precision (low-memory inference)")

    group = parser.add_argument_group("what to answer (default: chat in the terminal)")
    group.add_argument("--query", default=None, help="answer this one query on stdout and exit")
    group.add_argument("--test_path", default=None,
                       help="test file (JSONL or JSON array, training format) to predict and score")
    group.add_argument("--output_path", default=None, help="with --test_path: the predictions, one JSON a line")
    add_bool_flag(group, "--overwrite", "replace an existing --output_path")
    group.add_argument("--batch_size", type=int, default=8, help="with --test_path: prompts generated together")

    group = parser.add_argument_group("generation")
    group.add_argument("--max_new_tokens", type=int, default=512, help="longest answer in tokens")
    add_bool_flag(group, "--do_sample", "sample with --top_p / --temperature; False: greedy (or beam) search")
    group.add_argument("--top_p", type=float, default=0.8, help="nucleus sampling mass (with --do_sample True)")
    group.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (with --do_sample True)")
    group.add_argument("--num_beams", type=int, default=1,
                       help="beam search width (1: none); the terminal chat then prints each answer whole, since "
                            "beam search cannot stream")
    args = parser.parse_args(argv)

    if args.query is not None and args.test_path:
        parser.error("--query and --test_path exclude each other")
    if bool(args.test_path) != bool(args.output_path):
        parser.error("--test_path and --output_path go together")
    for flag in ("batch_size", "max_new_tokens", "num_beams"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.do_sample and not (0 < args.top_p <= 1):
        parser.error(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.do_sample and args.temperature <= 0:
        parser.error(f"--temperature must be positive, got {args.temperature}")
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


def generation_kwargs(args, tokenizer, mode: str) -> dict:
    kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample, "num_beams": args.num_beams,
              "eos_token_id": template.stop_token_ids(tokenizer, mode), "pad_token_id": tokenizer.pad_token_id}
    if args.do_sample:
        kwargs.update(top_p=args.top_p, temperature=args.temperature)
    else:  # no sampling settings, so generate() does not warn that they are unused
        kwargs.update(top_p=None, temperature=None, top_k=None)
    return kwargs


def answer_text(response) -> str:
    """A glm3/glm4 tool call comes back from process_response as {"name", "content"}: score it as JSON text."""
    return response if isinstance(response, str) else json.dumps(response, ensure_ascii=False)


def reference_answer(tokenizer, mode: str, messages: list[dict]) -> str:
    """The reference (the final assistant message) as chat() would return it had the model generated exactly the
    tokens training teaches for it: encoded by the template, then decoded and post-processed like every prediction
    (glm: ASCII punctuation beside Chinese becomes full-width; glm3/glm4: a tool call becomes {"name", "content"}; all:
    the official stripping). So a prediction identical token for token to the reference scores as equal."""
    ids, _, answer_start = template.encode_messages(tokenizer, mode, messages, learn_all_turns=False)
    return decode_answer(tokenizer, mode, ids[answer_start:], messages[:-1])


# ------------------------------------------------------------------------------------------------------------------
# batch prediction
# ------------------------------------------------------------------------------------------------------------------
def read_test_set(path: str, mode: str) -> list[dict]:
    """Every sample as {"query", "role", "history", "reference", "messages"}; any bad line fails here, before
    generation."""
    samples = []
    for number, record in read_records(path):
        where = f"{path}:{number}"
        messages = sample_to_messages(mode, record, where)
        prompt_messages = messages[:-1]
        if not prompt_messages:
            raise DataError(f"{where}: nothing to answer before the reference (the conversation is one answer)")
        last = prompt_messages[-1]
        if last["role"] == "assistant" or (mode not in template.MESSAGE_MODES and last["role"] != "user"):
            raise DataError(f"{where}: the message before the reference must come from the user, "
                            f"not {last['role']!r}")
        samples.append({"query": last["content"], "role": last["role"], "history": prompt_messages[:-1],
                        "reference": messages[-1]["content"], "messages": messages, "where": where})
    if not samples:
        raise DataError(f"{path}: no samples")
    return samples


def generate_batch(model, tokenizer, mode: str, prompts: list[list[int]], gen_kwargs: dict) -> list[list[int]]:
    """New token ids of each prompt, generated together with LEFT padding, cut at the first stop token."""
    batch = tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt")
    if tokenizer.padding_side != "left":
        raise RuntimeError(f"{type(tokenizer).__name__} pads on the {tokenizer.padding_side}; generation needs left")
    device = next(model.parameters()).device
    input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    with torch.inference_mode():
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, **gen_kwargs)
    return [template.cut_at_stop(tokenizer, mode, row) for row in output[:, input_ids.shape[1]:].tolist()]


def decode_answer(tokenizer, mode: str, new_ids: list[int], history) -> str:
    """The answer text as chat() returns it (the official post-processing of each version)."""
    if mode in template.MESSAGE_MODES:
        response, _ = template.decode_response(tokenizer, mode, new_ids, list(history))
        return answer_text(response)
    return template.decode_response(tokenizer, mode, new_ids)


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
    predictions = [None] * len(samples)
    with tqdm(total=len(samples), desc="predict", unit="sample", dynamic_ncols=True) as progress:
        for start in range(0, len(order), args.batch_size):
            indices = order[start:start + args.batch_size]
            new_ids = generate_batch(model, tokenizer, mode, [prompts[i] for i in indices], gen_kwargs)
            for index, ids in zip(indices, new_ids):
                predictions[index] = decode_answer(tokenizer, mode, ids, samples[index]["history"])
            progress.update(len(indices))

    references = [reference_answer(tokenizer, mode, s["messages"]) for s in samples]  # normalised alike
    metrics = compute_metrics(predictions, references)
    lines = [json.dumps({"prompt": s["query"], "reference": r, "prediction": p}, ensure_ascii=False)
             for s, r, p in zip(samples, references, predictions)]
    metrics_path = metrics_path_for(args.output_path)
    atomic_write_text(metrics_path, json.dumps(metrics, ensure_ascii=False, indent=2) + "\n")
    atomic_write_text(args.output_path, "\n".join(lines) + "\n")
    logger.info("wrote %d predictions to %s and metrics to %s", len(lines), args.output_path, metrics_path)
    return metrics


# ------------------------------------------------------------------------------------------------------------------
# chat
# ------------------------------------------------------------------------------------------------------------------
WELCOME = "欢迎使用 ChatGLM：输入内容即可对话，输入 clear 清空对话历史，输入 exit 退出程序。"


def chat_loop(model, tokenizer, gen_kwargs: dict, stdin=None, stdout=None) -> None:
    """Read a query a line, stream the answer; `clear` resets the history, `exit` (or end of input) quits."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    history = []
    stdout.write(WELCOME + "\n")
    while True:
        stdout.write("\n用户：")
        stdout.flush()
        line = stdin.readline()
        if not line:  # end of input (Ctrl-D)
            stdout.write("\n")
            break
        query = line.strip()
        if not query:
            continue
        if not is_utf8(query):  # the conversation so far stays
            stdout.write("输入不是 UTF-8 文本，请重新输入 (the input is not UTF-8 text; set the terminal to UTF-8)\n")
            continue
        if query == "exit":
            break
        if query == "clear":
            history = []
            stdout.write("对话历史已清空。\n")
            continue
        stdout.write("\nChatGLM：")
        stdout.flush()
        if gen_kwargs.get("num_beams", 1) > 1:  # transformers cannot stream beam search: the answer comes whole
            response, history = model.chat(tokenizer, query, history=history, **gen_kwargs)
            stdout.write(answer_text(response) + "\n")
            stdout.flush()
            continue
        printed = ""
        for response, new_history in model.stream_chat(tokenizer, query, history=history, **gen_kwargs):
            text = answer_text(response)
            if text.startswith(printed):  # post-processing can rewrite earlier characters; then wait for the end
                stdout.write(text[len(printed):])
                stdout.flush()
                printed = text
        if text != printed:
            stdout.write(f"\nChatGLM：{text}")
        stdout.write("\n")
        stdout.flush()
        history = new_history


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(rank=0)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        samples = None
        if args.test_path:  # every input problem shows before the model loads
            check_outputs(args)
            samples = read_test_set(args.test_path, args.mode)
        model, tokenizer = load_for_inference(args.mode, args.model_path, args.base_model_path, args.device,
                                              args.dtype, args.quantization_bit)
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
        response, _ = model.chat(tokenizer, args.query, history=[], **gen_kwargs)
        print(answer_text(response))
        return 0
    chat_loop(model, tokenizer, gen_kwargs)
    return 0


if __name__ == "__main__":
    from utils import keep_bitsandbytes_out
    keep_bitsandbytes_out(sys.argv[1:])  # QLoRA or not is known here; peft would import it regardless
    sys.exit(main())
