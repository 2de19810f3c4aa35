"""Shared helpers: reading instruction data, the training dataset and collator, boolean flags, logging setup."""
from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from model import template

logger = logging.getLogger("chatglm")


# ------------------------------------------------------------------------------------------------------------------
# command line and logging
# ------------------------------------------------------------------------------------------------------------------
def str2bool(value) -> bool:
    """A real boolean flag: `--prefix_projection True` / `False` (also true/false/1/0/yes/no)."""
    if isinstance(value, bool):
        return value
    lowered = str(value).strip().lower()
    if lowered in ("true", "1", "yes", "y", "on"):
        return True
    if lowered in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def add_bool_flag(group, flag: str, help: str, default: bool = False) -> None:
    """A boolean flag in both forms users write: bare `--flag` (True) and `--flag True` / `--flag False`."""
    group.add_argument(flag, type=str2bool, nargs="?", const=True, default=default, metavar="True|False",
                       help=f"{help} (bare {flag} means True; default {default})")


def setup_logging(rank: int) -> None:
    """INFO on rank 0, warnings only elsewhere: one voice in the console."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if rank <= 0 else logging.WARNING, force=True)


# ------------------------------------------------------------------------------------------------------------------
# data files
# ------------------------------------------------------------------------------------------------------------------
class DataError(ValueError):
    """Bad input data: the message names file and line."""


def read_records(path: str) -> list[tuple[int, dict]]:
    """(line number, object) for a JSONL file or a JSON array; a parse error names `file:line`."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: {e.msg}") from None
        # line of each array element is not kept by json; number them from 1 in order
        return [(i + 1, item) for i, item in enumerate(items)]
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: {e.msg} (column {e.colno})") from None
    return records


def sample_to_messages(mode: str, sample, where: str) -> list[dict]:
    """A sample of the seed format (instruction, input, output, optional history) or a ChatGLM3 `conversations`
    list, as template messages. `where` ("file:line") prefixes every error."""
    if not isinstance(sample, dict):
        raise DataError(f"{where}: a sample must be a JSON object, got {type(sample).__name__}")
    if "conversations" in sample:
        conversation = sample["conversations"]
        if not isinstance(conversation, list) or not conversation:
            raise DataError(f"{where}: 'conversations' must be a non-empty list")
        messages = []
        for turn in conversation:
            if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) \
                    or not isinstance(turn.get("content"), str):
                raise DataError(f"{where}: every conversation turn needs string 'role' and 'content'")
            if turn["role"] not in template.ROLES:
                raise DataError(f"{where}: unknown role {turn['role']!r}")
            messages.append(turn)
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: the conversation must end with an assistant turn")
        try:
            template.check_conversation(mode, messages)
        except ValueError as e:
            raise DataError(f"{where}: {e}") from None
        return messages
    if "output" not in sample:
        raise DataError(f"{where}: sample has no 'output'")
    for field in ("instruction", "input", "output"):
        if field in sample and not isinstance(sample[field], str):
            raise DataError(f"{where}: '{field}' must be a string, got {type(sample[field]).__name__}")
    history = sample.get("history") or []
    if not isinstance(history, list) or not all(
            isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)
            for turn in history):
        raise DataError(f"{where}: 'history' must be a list of [query, answer] string pairs")
    query = sample.get("instruction", "") + sample.get("input", "")
    messages = template.history_to_messages(mode, query, history)
    return messages + [{"role": "assistant", "content": sample["output"]}]


# ------------------------------------------------------------------------------------------------------------------
# training dataset
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class DataStats:
    samples: int = 0
    truncated: int = 0
    skipped: int = 0


def fit_prompt(tokenizer, mode: str, messages: list[dict], max_src_len: int) -> tuple[list[dict], bool]:
    """The conversation with its prompt (everything before the final answer) cut to at most `max_src_len` tokens,
    and whether anything was cut.

    Whole old rounds go first, oldest first (a round: a user turn and what follows it up to the next user turn);
    system messages and the last round (the question being answered, and for glm3 any tool call and observation
    after it) stay. If that is still too long, the oldest remaining text is cut, character by character from the
    start (the system message first, then the question). The template's own tokens ([gMASK] sop, role tokens, the
    answer cue) are never cut: the result is always a prompt `chat()` could have built."""
    context, answer = list(messages[:-1]), messages[-1]

    def fits(candidate):
        return len(template.encode_context(tokenizer, mode, candidate)) <= max_src_len

    if fits(context):
        return messages, False
    last_user = max((i for i, m in enumerate(context) if m["role"] == "user"), default=0)
    rounds, current = [], None  # indices of the old rounds, oldest first
    for index in range(last_user):
        if context[index]["role"] == "system":
            continue
        if context[index]["role"] == "user" or current is None:
            current = []
            rounds.append(current)
        current.append(index)
    dropped = set()
    for old_round in rounds:
        if fits([m for i, m in enumerate(context) if i not in dropped]):
            break
        dropped.update(old_round)
    context = [m for i, m in enumerate(context) if i not in dropped]
    index = 0
    while not fits(context) and index < len(context):
        message, text = context[index], context[index]["content"]
        if not fits(context[:index] + [{**message, "content": ""}] + context[index + 1:]):
            if message["role"] == "system":  # a system message cut to nothing goes
                del context[index]
            else:
                context[index] = {**message, "content": ""}
                index += 1
            continue
        low, high = 1, len(text)  # the fewest leading characters to drop: fits(text[high:]) holds
        while low < high:
            middle = (low + high) // 2
            if fits(context[:index] + [{**message, "content": text[middle:]}] + context[index + 1:]):
                high = middle
            else:
                low = middle + 1
        context[index] = {**message, "content": text[high:]}
    return context + [answer], True


class InstructionDataset(Dataset):
    """Tokenised once (reused across epochs) by the mode's chat template; labels are -100 on every prompt token.

    Over-long samples: the prompt is cut to `max_src_len` by `fit_prompt` (old rounds first, never the question or
    the template's own tokens), then the answer so that the sample fits `max_len`, keeping its end token. With
    `is_skip`, such samples are dropped instead."""

    def __init__(self, path: str, tokenizer, mode: str, max_len: int, max_src_len: int, is_skip: bool = False,
                 learn_all_turns: bool = True):
        shortest = template.template_length(tokenizer, mode)
        if max_src_len <= shortest or max_src_len >= max_len:
            raise ValueError(f"max_src_len={max_src_len} must exceed the {mode} template's own {shortest} tokens "
                             f"and stay below max_len={max_len}")
        self.stats = DataStats()
        self.examples = []
        for number, sample in read_records(path):
            where = f"{path}:{number}"
            messages, truncated = fit_prompt(tokenizer, mode, sample_to_messages(mode, sample, where), max_src_len)
            ids, labels, answer_start = template.encode_messages(tokenizer, mode, messages, learn_all_turns)
            if answer_start > max_src_len:  # the template of the final round alone is longer (glm3 tool turns)
                raise DataError(f"{where}: the prompt keeps {answer_start} tokens of template after cutting every "
                                f"text, more than max_src_len={max_src_len}")
            self.stats.samples += 1
            if len(ids) > max_len:  # the answer, cut so that it fits, keeping its end token
                ids, labels = ids[:max_len - 1] + ids[-1:], labels[:max_len - 1] + labels[-1:]
                truncated = True
            if truncated:
                self.stats.truncated += 1
                if is_skip:
                    self.stats.skipped += 1
                    continue
            self.examples.append({"input_ids": ids, "labels": labels})
        if not self.examples:
            raise DataError(f"{path}: no usable sample ({self.stats.samples} read, {self.stats.skipped} skipped "
                            f"as longer than max_len={max_len} / max_src_len={max_src_len})")
        logger.info("%s: %d samples, %d truncated%s", path, self.stats.samples, self.stats.truncated,
                    f", {self.stats.skipped} skipped (--is_skip)" if is_skip else "")

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, index):
        return self.examples[index]


class EvalShard(Dataset):
    """One rank's share of an evaluation set: samples rank, rank + world_size, ... The shares are padded to the same
    length with a copy of sample 0 whose labels are all -100, so every rank runs the same number of forwards (ZeRO-3
    gathers parameters collectively) and no sample is counted twice."""

    def __init__(self, dataset, rank: int, world_size: int):
        self.dataset = dataset
        padded = -(-len(dataset) // world_size) * world_size
        self.indices = list(range(rank, padded, world_size))

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, index):
        position = self.indices[index]
        if position < len(self.dataset):
            return self.dataset[position]
        example = self.dataset[0]
        return {"input_ids": example["input_ids"], "labels": [template.IGNORE_INDEX] * len(example["labels"])}


class DataCollator:
    """Pads a batch to its longest sample. Training pads on the right: every pad then comes after all real tokens,
    so the causal mask alone keeps them out of every real token's attention, no attention_mask is needed and SDPA
    keeps its fused causal kernel; padded labels are -100."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, batch):
        longest = max(len(example["input_ids"]) for example in batch)
        input_ids = torch.full((len(batch), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), longest), template.IGNORE_INDEX, dtype=torch.long)
        for row, example in enumerate(batch):
            input_ids[row, :len(example["input_ids"])] = torch.tensor(example["input_ids"])
            labels[row, :len(example["labels"])] = torch.tensor(example["labels"])
        return {"input_ids": input_ids, "labels": labels}


def count_parameters(model) -> tuple[int, int]:
    """(trainable, all) parameter counts; under ZeRO-3 a partitioned parameter reports its full size as ds_numel."""
    trainable = total = 0
    for param in model.parameters():
        count = getattr(param, "ds_numel", param.numel())
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total


class LengthGroupedSampler(torch.utils.data.Sampler):
    """Random order, but each rank's micro-batches hold samples of similar length, so padding wastes little compute.

    Every epoch: shuffle (seeded by seed + epoch, the same on every rank), cut into mega-batches of 50 global
    batches, sort each by length (longest first), deal the global batches out to the ranks and shuffle the order
    of the global batches. Every sample is seen once per epoch (the last incomplete global batch is dropped)."""

    def __init__(self, lengths, batch_size: int, world_size: int, rank: int, seed: int = 0, mega: int = 50):
        self.lengths, self.batch_size, self.world_size, self.rank = lengths, batch_size, world_size, rank
        self.seed, self.mega, self.epoch = seed, mega, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def _global_batches(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        global_size = self.batch_size * self.world_size
        span = global_size * self.mega
        batches = []
        for start in range(0, len(order), span):
            chunk = sorted(order[start:start + span], key=lambda i: -self.lengths[i])
            batches += [chunk[i:i + global_size] for i in range(0, len(chunk), global_size)]
        batches = [b for b in batches if len(b) == global_size]
        permutation = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in permutation]

    def __iter__(self):
        for batch in self._global_batches():
            yield from batch[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def __len__(self):
        return len(self.lengths) // (self.batch_size * self.world_size) * self.batch_size


# ------------------------------------------------------------------------------------------------------------------
# inference loading
# ------------------------------------------------------------------------------------------------------------------
class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded: the one-line message names the directory or file."""


def inference_device(device=None) -> "torch.device":
    """'cpu', 'cuda', 'cuda:N' or a bare GPU index ('0', 0) as a torch.device; None: the first GPU, else the CPU."""
    if device is None or device == "":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    text = str(device).strip().lower()
    if text.isdigit():
        text = f"cuda:{text}"
    try:
        resolved = torch.device(text)
    except RuntimeError:
        raise CheckpointError(f"--device {device!r}: expected cpu, cuda, cuda:N or a GPU index") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise CheckpointError(f"--device {device!r}: no CUDA GPU is available on this machine (use --device cpu)")
        index = resolved.index or 0
        if index >= torch.cuda.device_count():
            raise CheckpointError(f"--device {device!r}: only {torch.cuda.device_count()} GPU(s) are visible")
    return resolved


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_NAMES = {**DTYPES, "float32": torch.float32, "float16": torch.float16, "half": torch.float16,
                "bfloat16": torch.bfloat16}


def auto_precision(device_type: str) -> str:
    """What "auto" means for training and inference alike: fp32 on the CPU; bf16 on a GPU that has it, else fp16."""
    if device_type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def inference_dtype(dtype, device) -> "torch.dtype":
    """A torch dtype from None/'auto' (see auto_precision), a name (fp32, fp16, bf16) or a torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or str(dtype).lower() == "auto":
        return DTYPES[auto_precision(torch.device(device).type)]
    try:
        return _DTYPE_NAMES[str(dtype).lower()]
    except KeyError:
        raise CheckpointError(f"dtype {dtype!r}: expected auto, fp32, fp16 or bf16") from None


def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return value


def checkpoint_kind(model_path: str) -> str:
    """'lora' (a PEFT adapter), 'ptuning' (a prefix encoder) or 'full' (config.json + weights), by the files in it."""
    if not os.path.isdir(model_path):
        raise CheckpointError(f"{model_path}: no such checkpoint directory")
    names = set(os.listdir(model_path))
    if "adapter_config.json" in names:
        return "lora"
    if "prefix_encoder.safetensors" in names:
        return "ptuning"
    if "config.json" in names and any(n.endswith((".safetensors", ".bin")) for n in names):
        return "full"
    raise CheckpointError(f"{model_path}: neither a full model (config.json + *.safetensors), a LoRA adapter "
                          f"(adapter_config.json) nor a P-Tuning prefix (prefix_encoder.safetensors)")


def _base_of(mode: str, model_path: str, kind: str, base_model_path: str | None) -> str:
    """The base checkpoint under an adapter or prefix: the flag, else training_args.json, else adapter_config.json;
    checked to be a checkpoint directory of `mode`."""
    from model import check_checkpoint_dir

    where = "--base_model_path"
    base = base_model_path
    args_file = os.path.join(model_path, "training_args.json")
    if base is None and os.path.isfile(args_file):
        base, where = read_json(args_file).get("model_name_or_path"), args_file
    adapter_file = os.path.join(model_path, "adapter_config.json")
    if base is None and kind == "lora":
        base, where = read_json(adapter_file).get("base_model_name_or_path"), adapter_file
    if not base:
        raise CheckpointError(f"{model_path}: a {kind} checkpoint needs its base model: pass --base_model_path "
                              f"(no training_args.json names one)")
    if not os.path.isdir(base):
        raise CheckpointError(f"{model_path}: its base model {base} (from {where}) does not exist; "
                              f"pass --base_model_path")
    try:
        check_checkpoint_dir(base, mode)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{model_path}: base model from {where} is unusable: {e}") from None
    return base


def _load_prefix(model, model_path: str, config: dict) -> None:
    """Copy prefix_encoder.safetensors into the model's prefix encoder; every key and shape must match."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights_file = os.path.join(model_path, "prefix_encoder.safetensors")
    try:
        saved = load_file(weights_file)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights_file}: cannot be read ({e})") from None
    wanted = {name: param for name, param in model.named_parameters() if ".prefix_encoder." in f".{name}"}
    settings = f"pre_seq_len={config.get('pre_seq_len')}, prefix_projection={config.get('prefix_projection')}"
    if set(saved) != set(wanted):
        extra, missing = sorted(set(saved) - set(wanted)), sorted(set(wanted) - set(saved))
        raise CheckpointError(f"{weights_file}: its keys do not fit config.json ({settings}): "
                              f"unexpected {extra[:3]}, missing {missing[:3]}")
    for name, param in wanted.items():
        if tuple(saved[name].shape) != tuple(param.shape):
            raise CheckpointError(f"{weights_file}: {name} has shape {tuple(saved[name].shape)}, but config.json "
                                  f"({settings}) needs {tuple(param.shape)}")
    with torch.no_grad():
        for name, param in wanted.items():
            param.copy_(saved[name].to(param.dtype))


def check_adapter_loaded(peft_model, adapter_dir: str) -> None:
    """Fail unless every weight in the adapter file went into the model and every LoRA weight of the model came
    from it. peft only warns when the names do not match (an adapter of another model version), and would then
    answer with the untouched base."""
    from peft.utils import get_peft_model_state_dict

    weights_file = os.path.join(adapter_dir, "adapter_model.safetensors")
    if os.path.isfile(weights_file):
        from safetensors import safe_open

        with safe_open(weights_file, framework="pt") as f:
            saved = set(f.keys())
    elif os.path.isfile(os.path.join(adapter_dir, "adapter_model.bin")):
        weights_file = os.path.join(adapter_dir, "adapter_model.bin")
        saved = set(torch.load(weights_file, map_location="cpu", weights_only=True))
    else:
        raise CheckpointError(f"{adapter_dir}: no adapter_model.safetensors (or adapter_model.bin)")
    # Only the LoRA matrices are compared (an adapter may also carry modules_to_save copies, which peft handles).
    saved = {key for key in saved if "lora_" in key}
    expected = {key for key in get_peft_model_state_dict(peft_model, save_embedding_layers=False) if "lora_" in key}
    if saved != expected:
        unexpected, missing = sorted(saved - expected), sorted(expected - saved)
        raise CheckpointError(f"{weights_file}: the adapter does not fit the base model: {len(unexpected)} weights "
                              f"match no module (e.g. {unexpected[:1]}), {len(missing)} LoRA weights are not in "
                              f"the file (e.g. {missing[:1]})")


def check_trained_mode(checkpoint_dir: str, mode: str) -> None:
    """A checkpoint train.py wrote records its --mode in training_args.json: it must be `mode`."""
    args_file = os.path.join(checkpoint_dir, "training_args.json")
    if os.path.isfile(args_file):
        trained_mode = read_json(args_file).get("mode")
        if trained_mode and trained_mode != mode:
            raise CheckpointError(f"{args_file}: this checkpoint was trained with --mode {trained_mode}, "
                                  f"but --mode is {mode}")


def attach_lora(model, adapter_dir: str, where: str, **peft_kwargs):
    """The PEFT adapter in `adapter_dir` on top of `model` (not merged), every weight checked to fit; `where`
    starts the one-line error."""
    import warnings

    from peft import PeftModel

    try:
        with warnings.catch_warnings():  # names that fit no module: check_adapter_loaded says it in one line
            warnings.filterwarnings("ignore", message="Found missing adapter keys")
            peft_model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False, **peft_kwargs)
    except (RuntimeError, ValueError, KeyError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{where}: the adapter does not fit the base: {first_line}") from None
    check_adapter_loaded(peft_model, adapter_dir)
    return peft_model


def load_tokenizer(spec, checkpoint_dir: str, base_dir: str):
    """The tokenizer saved with the checkpoint (train.py writes it), else the base's."""
    has_own = os.path.isfile(os.path.join(checkpoint_dir, spec.tokenizer_file))
    return spec.tokenizer.from_pretrained(checkpoint_dir if has_own else base_dir)


def load_for_inference(mode: str, model_path: str, base_model_path: str | None = None, device="cpu",
                       dtype=None, quantization_bit: int | None = None):
    """(model, tokenizer) ready to generate from a checkpoint directory train.py wrote, or an official one.

    - full model (freeze / all training, merge_lora.py output, official checkpoints): loaded as it is;
    - LoRA adapter (adapter_config.json): the base, with the adapter on top (a peft model, not merged);
    - P-Tuning prefix (prefix_encoder.safetensors + config.json): the base built with the saved pre_seq_len and
      prefix_projection, then the prefix weights.
    The base is `base_model_path`, else the training_args.json's model_name_or_path, else (LoRA) the
    adapter_config.json's base_model_name_or_path. dtype None: fp32 on the CPU, bf16 on a GPU that has it, else fp16.
    quantization_bit 4 or 8 loads the (base) model quantized through bitsandbytes (quantization.py), computing in
    dtype; an adapter or prefix on top stays in full precision. The model comes back in eval mode on `device`. Problems raise CheckpointError with one line.
    """
    from model import MODE, check_checkpoint_dir

    if mode not in MODE:
        raise CheckpointError(f"--mode {mode!r}: expected one of {', '.join(sorted(MODE))}")
    spec = MODE[mode]
    model_path = str(model_path)
    kind = checkpoint_kind(model_path)
    check_trained_mode(model_path, mode)
    device = inference_device(device)
    dtype = inference_dtype(dtype, device)

    def load(path, **kwargs):
        if quantization_bit:
            import quantization
            return quantization.load_quantized(spec.model, path, quantization_bit, dtype, device, **kwargs)
        return spec.model.from_pretrained(path, dtype=dtype, **kwargs)

    try:
        if kind == "full":
            check_checkpoint_dir(model_path, mode)
            model = load(model_path)
            base = model_path
        elif kind == "ptuning":
            config = check_checkpoint_dir(model_path, mode)
            if not config.get("pre_seq_len"):
                raise CheckpointError(f"{os.path.join(model_path, 'config.json')}: prefix_encoder.safetensors is "
                                      f"here, but config.json sets no pre_seq_len")
            base = _base_of(mode, model_path, kind, base_model_path)
            model = load(base, pre_seq_len=config["pre_seq_len"],
                         prefix_projection=bool(config.get("prefix_projection")))
            _load_prefix(model, model_path, config)
        else:
            base = _base_of(mode, model_path, kind, base_model_path)
            model = attach_lora(load(base), model_path, f"{model_path} (on {base})")
    except CheckpointError:
        raise
    except (OSError, ValueError) as e:  # the model layer's own one-line errors
        raise CheckpointError(str(e)) from None

    tokenizer = load_tokenizer(spec, model_path, base)
    if not quantization_bit:  # a quantized model was loaded onto the device already
        model = model.to(device)
    else:
        # Nothing of it trains here; and bitsandbytes' CPU inference kernel adds a bias in place, which autograd
        # refuses for a bias that requires grad when called outside inference_mode/no_grad.
        model.requires_grad_(False)
    model.eval()
    logger.info("loaded %s checkpoint %s (%s, base %s) on %s as %s%s", mode, model_path, kind, base, device,
                str(dtype).replace("torch.", ""), f", base {quantization_bit}-bit" if quantization_bit else "")
    return model, tokenizer
