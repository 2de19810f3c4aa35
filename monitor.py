"""What a training run shows besides the loss number: the data as the model sees it (`--preview`), warnings before a
run goes wrong, answers to a few prompts at every evaluation (`--sample_prompts`), and a loss plot (loss.png).

train.py calls in at four places: `add_flags` / `check_flags` (its argparse), `preview_only` (`--preview_only`),
`Monitor(...)` once the data is read (before the model loads) and `Monitor.at_evaluation` / `Monitor.at_end`.
"""
from __future__ import annotations

import json
import logging
import os
import sys

import torch

import quantization
import sequence_parallel
from dataset import DataError, read_records, sample_to_messages
from model import template
from model.config import read_json
from utils import add_bool_flag, auto_precision, setup_logging

logger = logging.getLogger("chatglm")

# ------------------------------------------------------------------------------------------------------------------
# flags
# ------------------------------------------------------------------------------------------------------------------
PREVIEW_ONLY_SAMPLES = 3  # --preview_only without --preview N


def add_flags(parser) -> None:
    group = parser.add_argument_group("watching the run")
    group.add_argument("--preview", type=int, default=0, metavar="N",
                       help="before training, print the first N training samples as the model sees them: the "
                            "decoded text with the learned tokens marked, token counts, whether the stop token is "
                            "learned, what truncation did")
    add_bool_flag(group, "--preview_only",
                  f"print the data set's shape, the warnings and the preview (--preview N, default "
                  f"{PREVIEW_ONLY_SAMPLES}), then exit: no DeepSpeed, no model weights, nothing written")
    group.add_argument("--sample_prompts", default=None, metavar="FILE",
                       help="prompts (JSONL or JSON array in the training formats, the answer optional; or bare "
                            "JSON strings) answered greedily at every evaluation and at the end, written to "
                            "output_dir/samples.jsonl and TensorBoard")
    group.add_argument("--max_new_tokens", type=int, default=64,
                       help="with --sample_prompts: longest answer in tokens; an answer that has not reached the "
                            "stop token by then is flagged no_stop")


def check_flags(parser, args) -> None:
    if args.preview < 0:
        parser.error(f"--preview must be at least 0, got {args.preview}")
    if args.max_new_tokens < 1:
        parser.error(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}")
    if args.preview_only and not args.preview:
        args.preview = PREVIEW_ONLY_SAMPLES
    if args.sample_prompts and not os.path.isfile(args.sample_prompts):
        parser.error(f"--sample_prompts {args.sample_prompts}: no such file")


# ------------------------------------------------------------------------------------------------------------------
# the data set's shape and the preview
# ------------------------------------------------------------------------------------------------------------------
def labelled(labels) -> int:
    """Tokens a sample teaches: labels after the first position (the loss predicts each token from those before)."""
    return sum(label != template.IGNORE_INDEX for label in labels[1:])


def describe_data(path: str, dataset) -> str:
    """One line: samples, labelled tokens, truncated, skipped (and why), longest."""
    stats = dataset.stats
    lengths = [len(example["input_ids"]) for example in dataset.examples]
    tokens = sum(labelled(example["labels"]) for example in dataset.examples)
    reasons = [f"{count} {why}" for count, why in ((stats.skipped, "truncated (--is_skip)"),
                                                    (stats.unfit, "too long even after truncation")) if count]
    return (f"{path}: {stats.samples} samples, {tokens} labelled tokens, {stats.truncated} truncated, "
            f"{stats.skipped + stats.unfit} skipped" + (f" ({', '.join(reasons)})" if reasons else "")
            + f", longest {max(lengths, default=0)} tokens")


MARKS = {True: ("\033[1;32m", "\033[0m"), False: ("[[", "]]")}  # learned span: green on a terminal, else brackets


def render(tokenizer, ids, labels, stops, colour: bool) -> str:
    """The decoded sample, each run of learned tokens marked."""
    start, end = MARKS[colour]
    runs, text = [], []
    for token, label in zip(ids, labels):
        learned = label != template.IGNORE_INDEX
        if runs and runs[-1][0] == learned:
            runs[-1][1].append(token)
        else:
            runs.append((learned, [token]))
    for learned, tokens in runs:
        piece = "".join(decode_visibly(tokenizer, tokens, stops))
        text.append(f"{start}{piece}{end}" if learned else piece)
    return "".join(text)


def decode_visibly(tokenizer, tokens, stops):
    """Decoded text, the stop tokens by name (decode leaves the end token out)."""
    pending = []
    for token in tokens:
        if token in stops:
            if pending:
                yield tokenizer.decode(pending)
                pending = []
            yield tokenizer.convert_ids_to_tokens(token)
        else:
            pending.append(token)
    if pending:
        yield tokenizer.decode(pending)


DROPPED = {"is_skip": "skipped (--is_skip)",
           "unfit": "skipped: cannot fit even after truncation (system text, tools and tool calls are never cut)"}


def preview_lines(args, tokenizer, dataset, colour: bool = False) -> list[str]:
    """The first --preview samples of --train_path as the model sees them: each record's fate in `dataset` (the
    training set as build_data made it with the run's flags, before --packing), named by its file and line."""
    if getattr(args, "stage", "sft") != "sft":  # pairs: both answers on their shared prompt
        import preference
        return preference.preview_lines(args, tokenizer, colour)
    stops = set(template.stop_token_ids(tokenizer, args.mode))
    lines = [f"preview of the first {args.preview} samples of {args.train_path}: learned tokens "
             + ("in green" if colour else "in [[ ]]")]
    records = read_records(args.train_path)[:args.preview]
    for number, ((_, record), fate) in enumerate(zip(records, dataset.fates), start=1):
        messages = sample_to_messages(args.mode, record, fate.where)
        full_ids, _, _ = template.encode_messages(tokenizer, args.mode, messages, not args.last_turn_only)
        if fate.dropped:
            lines.append(f"--- sample {number} ({fate.where}): {DROPPED[fate.dropped]}: {len(full_ids)} tokens do not "
                         f"fit --max_len {args.max_len} / --max_src_len {args.max_src_len}")
            continue
        example, truncated = dataset.examples[fate.index], fate.truncated
        ids, labels = example["input_ids"], example["labels"]
        learned = [token for token, label in zip(ids, labels) if label != template.IGNORE_INDEX]
        stop = next((token for token in reversed(learned) if token in stops), None)
        cut = (f"cut from {len(full_ids)} to {len(ids)} tokens (--max_len {args.max_len}, --max_src_len "
               f"{args.max_src_len})" if truncated else "none")
        lines.append(f"--- sample {number} ({fate.where}): {len(ids)} tokens, {len(ids) - len(learned)} prompt, "
                     f"{len(learned)} learned; stop token learned: "
                     + (f"yes ({tokenizer.convert_ids_to_tokens(stop)})" if stop is not None else "NO")
                     + f"; truncation: {cut}")
        lines.append(render(tokenizer, ids, labels, stops, colour))
    return lines


def show_preview(args, tokenizer, dataset, stream=None) -> None:
    stream = stream or sys.stdout
    colour = stream.isatty() and "NO_COLOR" not in os.environ
    stream.write("\n".join(preview_lines(args, tokenizer, dataset, colour)) + "\n")
    stream.flush()


# ------------------------------------------------------------------------------------------------------------------
# warnings before a run goes wrong
# ------------------------------------------------------------------------------------------------------------------
# fp16 runs reported to overflow (loss NaN, "loss scale already at minimum", answers of "!!!!"), with where:
FP16_OVERFLOWS = {
    ("ptuning", None): "P-Tuning v2 in fp16 is reported to overflow to a NaN loss (liucongg/ChatGLM-Finetuning#132, "
                       "THUDM/ChatGLM2-6B#276)",
    ("all", None): "full fine-tuning in fp16 is reported to reach a NaN loss after the first step "
                   "(THUDM/ChatGLM-6B#325)",
    (None, "glm4"): "GLM-4-9B was trained in bf16 and overflows in fp16 (intel/ipex-llm#11299)",
}
# The peak lr each train type usually takes on the 6B/9B models (THUDM's fine-tuning demos, this README), and the
# rate from which on we call one far above it (10x). Tiny test models (under BIG_MODEL parameters) take far larger
# rates, so the check only applies to real-sized models.
USUAL_LR = {"lora": (1e-4, 5e-4), "ptuning": (1e-2, 2e-2), "freeze": (1e-5, 1e-4), "all": (1e-5, 5e-5)}
FAR_ABOVE = 10
BIG_MODEL = 1e9


def estimated_parameters(model_dir: str) -> float:
    """About 12 * layers * hidden^2 (the blocks' weights) from config.json, without loading the model."""
    config = read_json(os.path.join(model_dir, "config.json"))
    return 12 * config.get("num_layers", 0) * config.get("hidden_size", 0) ** 2


def resolved_precision(choice: str) -> str:
    return choice if choice != "auto" else auto_precision("cuda" if torch.cuda.is_available() else "cpu")


def run_warnings(args, dataset, tokenizer, parameters: float | None = None) -> list[str]:
    """One line each, with the reason, for what is known to spoil a run; [] when nothing is."""
    warnings = []
    if resolved_precision(args.precision) == "fp16":
        for (train_type, mode), reason in FP16_OVERFLOWS.items():
            if train_type in (None, args.train_type) and mode in (None, args.mode):
                warnings.append(f"--precision fp16 with --mode {args.mode} --train_type {args.train_type}: {reason}; "
                                f"use bf16 (a GPU that has it) or fp32")
    parameters = estimated_parameters(args.model_name_or_path) if parameters is None else parameters
    low, high = USUAL_LR[args.train_type]
    if parameters >= BIG_MODEL and args.learning_rate > FAR_ABOVE * high:
        warnings.append(f"--learning_rate {args.learning_rate:g} is over {FAR_ABOVE}x what --train_type "
                        f"{args.train_type} usually takes ({low:g} to {high:g}): the loss is likely to diverge or the "
                        f"model to forget what it knew")
    examples, stats = dataset.examples, dataset.stats
    stops = set(template.stop_token_ids(tokenizer, args.mode))
    no_stop = [i for i, e in enumerate(examples) if not any(label in stops for label in e["labels"])]
    if no_stop:
        warnings.append(f"{args.train_path}: {len(no_stop)} of {len(examples)} samples never learn the stop token "
                        f"(first: sample {no_stop[0] + 1} as read): the model will not learn where an answer ends")
    if stats.samples and stats.truncated * 2 > stats.samples:
        warnings.append(f"{args.train_path}: most samples are truncated ({stats.truncated} of {stats.samples}) at "
                        f"--max_len {args.max_len} / --max_src_len {args.max_src_len}"
                        + (" and skipped (--is_skip)" if args.is_skip else "")
                        + ": raise them, or see --preview what is left")
    masked = [i for i, e in enumerate(examples) if not labelled(e["labels"])]
    if masked:
        warnings.append(f"{args.train_path}: {len(masked)} of {len(examples)} samples have every label masked "
                        f"(first: sample {masked[0] + 1} as read): they teach nothing")
    return warnings


# ------------------------------------------------------------------------------------------------------------------
# sample answers
# ------------------------------------------------------------------------------------------------------------------
def read_sample_prompts(path: str, mode: str) -> list[dict]:
    """{"messages", "prompt", "where"} for each record: a training sample whose answer ("output", or a final
    assistant turn) may be left out, or a bare JSON string (a query)."""
    prompts = []
    for number, record in read_records(path):
        where = f"{path}:{number}"
        if isinstance(record, str):
            record = {"instruction": record}
        if isinstance(record, dict) and "conversations" in record:
            turns = record["conversations"]
            if isinstance(turns, list) and turns and isinstance(turns[-1], dict) \
                    and turns[-1].get("role") != "assistant":
                record = {**record, "conversations": turns + [{"role": "assistant", "content": ""}]}
        elif isinstance(record, dict):
            record = {"output": "", **record}
        messages = sample_to_messages(mode, record, where)[:-1]
        if not messages or messages[-1]["role"] == "assistant" or (
                mode not in template.MESSAGE_MODES and messages[-1]["role"] != "user"):
            raise DataError(f"{where}: a sample prompt must end with a user turn")
        prompts.append({"messages": messages, "prompt": messages[-1]["content"], "line": number})
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts


def loop_length(ids: list[int], shortest_run: int = 12) -> int:
    """The period (in tokens) of the first n-gram loop in `ids`, 0 if none: a block of p tokens repeated back to
    back over at least max(3p, shortest_run) tokens (three repeats, and more for short blocks: "哈哈哈" is no loop)."""
    for period in range(1, len(ids) // 3 + 1):
        run = 0
        for index in range(period, len(ids)):
            run = run + 1 if ids[index] == ids[index - period] else 0
            if run + period >= max(3 * period, shortest_run):
                return period
    return 0


def answer_flags(new_ids: list[int], stops: set, max_new_tokens: int) -> list[str]:
    """"no_stop": generation ran to max_new_tokens without a stop token; "repeats": the answer loops."""
    flags = []
    if not any(token in stops for token in new_ids) and len(new_ids) >= max_new_tokens:
        flags.append("no_stop")
    if loop_length([token for token in new_ids if token not in stops]):
        flags.append("repeats")
    return flags


def generate_answers(model, tokenizer, mode: str, prompts: list[dict], max_new_tokens: int, device,
                     synced: bool) -> list[list[int]]:
    """Greedy new ids of each prompt, one at a time (no padding to get wrong). `synced`: every rank runs the same
    forwards until all are done (ZeRO-3 gathers each layer's weights collectively)."""
    stops = template.stop_token_ids(tokenizer, mode)
    answers = []
    for prompt in prompts:
        ids = torch.tensor([template.encode_context(tokenizer, mode, prompt["messages"])], device=device)
        output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                do_sample=False, num_beams=1, top_p=None, top_k=None, temperature=None,
                                eos_token_id=stops, pad_token_id=tokenizer.pad_token_id, synced_gpus=synced)
        new_ids = output[0, ids.shape[1]:].tolist()
        stop_at = next((i for i, token in enumerate(new_ids) if token in stops), None)
        answers.append(new_ids if stop_at is None else new_ids[:stop_at + 1])  # the stop token kept: it was reached
    return answers


# ------------------------------------------------------------------------------------------------------------------
# the loss plot
# ------------------------------------------------------------------------------------------------------------------
SMOOTHING = 0.6  # TensorBoard's default weight of its exponential moving average


def smooth(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """TensorBoard's debiased exponential moving average."""
    smoothed, last, steps = [], 0.0, 0
    for value in values:
        steps += 1
        last = last * weight + (1 - weight) * value
        smoothed.append(last / (1 - weight ** steps))
    return smoothed


def read_log(log_file: str) -> tuple[dict, dict]:
    """({step: (loss, lr)}, {step: eval loss}) from train_log.jsonl; should a step appear twice (a log written before
    a resumed run dropped the records after its checkpoint: train.drop_records_after), its last record wins."""
    train, evals = {}, {}
    if not os.path.isfile(log_file):
        return train, evals
    with open(log_file, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            record = json.loads(line)
            if "loss" in record:  # loss null: a window without labelled tokens (train.py); lr may be absent
                train[record["step"]] = (record["loss"], record.get("lr"))
            if "eval_loss" in record:
                evals[record["step"]] = record["eval_loss"]
    return dict(sorted(train.items())), dict(sorted(evals.items()))


def plot_loss(output_dir: str) -> str | None:
    """output_dir/loss.png from train_log.jsonl: training loss raw and smoothed, eval loss, lr on a second axis.
    The number of points of each line goes into the PNG's text ("points"). Returns the path, None if nothing to
    draw. Drawn with matplotlib's object API on the Agg canvas: no pyplot state, no GUI backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train, evals = read_log(os.path.join(output_dir, "train_log.jsonl"))
    if not train and not evals:
        return None
    figure = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    loss_axis = figure.add_subplot()
    lr_axis = loss_axis.twinx()
    steps = [step for step, (loss, _) in train.items() if loss is not None]
    losses = [train[step][0] for step in steps]
    lr_steps = [step for step, (_, lr) in train.items() if lr is not None]
    lines = [loss_axis.plot(steps, losses, color="tab:blue", alpha=0.35, marker=".", label="training loss")[0],
             loss_axis.plot(steps, smooth(losses), color="tab:blue", label=f"smoothed ({SMOOTHING})")[0],
             loss_axis.plot(list(evals), list(evals.values()), color="tab:orange", marker="o", label="eval loss")[0],
             lr_axis.plot(lr_steps, [train[step][1] for step in lr_steps], color="tab:gray", linestyle="--",
                          label="learning rate")[0]]
    loss_axis.set_xlabel("optimizer step")
    loss_axis.set_ylabel("loss per labelled token")
    lr_axis.set_ylabel("learning rate")
    lr_axis.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    loss_axis.legend(lines, [line.get_label() for line in lines], loc="upper right")
    loss_axis.set_title(output_dir)
    points = {line.get_label(): len(line.get_xdata()) for line in lines}
    path = os.path.join(output_dir, "loss.png")
    partial = path + ".partial"
    figure.savefig(partial, format="png", metadata={"points": json.dumps(points)})
    os.replace(partial, path)  # a reader never sees half a PNG
    return path


# ------------------------------------------------------------------------------------------------------------------
# what train.py calls
# ------------------------------------------------------------------------------------------------------------------
def preview_only(args, build_data, checkpoint_errors) -> None:
    """--preview_only: the tokenizer and the data, no DeepSpeed, no weights, nothing written."""
    from model import MODE

    setup_logging(rank=0)
    with checkpoint_errors():
        tokenizer = MODE[args.mode].tokenizer.from_pretrained(args.model_name_or_path)
    train_set, _ = build_data(args, tokenizer)
    Monitor(args, tokenizer, getattr(train_set, "unpacked", train_set), rank=0, world_size=1)


class Monitor:
    """Before training (on construction): the data set's shape, the warnings, the preview (each sample as train.py's
    `build_data` made it: `train_set`, before --packing); the sample prompts are read now so that a bad file stops
    the run before the model loads. Then answers and the plot at each evaluation and at the end."""

    def __init__(self, args, tokenizer, train_set, rank: int, world_size: int):
        self.args, self.tokenizer, self.rank = args, tokenizer, rank
        self.prompts = read_sample_prompts(args.sample_prompts, args.mode) if args.sample_prompts else []
        # Under ZeRO-3 each forward gathers the weights from all ranks: every rank generates, in step.
        self.synced = quantization.zero_stage(args.ds_file) == 3 and world_size > 1
        self.done_step = None
        if rank == 0:
            logger.info(describe_data(args.train_path, train_set))
            for warning in run_warnings(args, train_set, tokenizer):
                logger.warning(warning)
            if args.preview:
                show_preview(args, tokenizer, train_set)

    def at_evaluation(self, engine, step: int, writer) -> None:
        """Answers to --sample_prompts and loss.png (rank 0 writes both)."""
        if self.done_step == step:
            return
        self.done_step = step
        if self.prompts and (self.rank == 0 or self.synced):
            self.answer(engine, step, writer)
        if self.rank == 0:
            path = plot_loss(self.args.output_dir)
            if path:
                logger.info("step %d | loss plot %s", step, path)

    at_end = at_evaluation  # the end counts as one more evaluation (not twice when the last step evaluated)

    def answer(self, engine, step: int, writer) -> None:
        tokenizer, mode, limit = self.tokenizer, self.args.mode, self.args.max_new_tokens
        engine.eval()
        # whole prompts through the plain attention: rank 0 generates alone (sequence_parallel.whole_sequences)
        with torch.no_grad(), sequence_parallel.whole_sequences(engine.module):
            answers = generate_answers(engine.module, tokenizer, mode, self.prompts, limit, engine.device,
                                       self.synced)
        engine.train()
        if self.rank != 0:
            return
        from predict import decode_answer

        stops = set(template.stop_token_ids(tokenizer, mode))
        path = os.path.join(self.args.output_dir, "samples.jsonl")
        flagged = {"repeats": [], "no_stop": []}
        with open(path, "a", encoding="utf-8") as f:
            for index, (prompt, new_ids) in enumerate(zip(self.prompts, answers)):
                text = decode_answer(tokenizer, mode, new_ids, prompt["messages"][:-1])
                flags = answer_flags(new_ids, stops, limit)
                f.write(json.dumps({"step": step, "prompt": prompt["prompt"], "answer": text, "flags": flags,
                                    "tokens": len(new_ids)}, ensure_ascii=False) + "\n")
                if writer:
                    writer.add_text(f"samples/{index + 1}", f"**prompt:** {prompt['prompt']}\n\n**answer:** {text}"
                                    + (f"\n\n*{', '.join(flags)}*" if flags else ""), step)
                for flag in flags:
                    loop = loop_length([token for token in new_ids if token not in stops])
                    flagged[flag].append(f"{prompt['line']}" + (f" ({loop}-token loop)" if flag == "repeats" else ""))
        logger.info("step %d | %d sample answers in %s", step, len(answers), path)
        for flag, what in (("repeats", "repeat themselves (an n-gram loop)"),
                           ("no_stop", f"did not reach the stop token within --max_new_tokens {limit}")):
            if flagged[flag]:  # one line per kind and evaluation, naming the prompts by their line
                logger.warning("step %d | %d of %d sample answers %s: %s line%s %s", step, len(flagged[flag]),
                               len(answers), what, self.args.sample_prompts, "s" * (len(flagged[flag]) > 1),
                               ", ".join(flagged[flag]))
