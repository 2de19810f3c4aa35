"""train.py end to end on tiny checkpoints, on the CPU under the deepspeed launcher (DS_ACCELERATOR=cpu, gloo)."""
import json
import os
import shutil
import subprocess
import sys
from itertools import count
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, shared_path
from dropin_checks import TRAIN_EXTRAS, assert_dropin
from model import MODE, template
from utils import InstructionDataset, load_for_inference

PORTS = count(29700 + os.getpid() % 200)
TRAIN_TYPES = ("freeze", "lora", "ptuning", "all")
LORA_MODULES = "query_key_value,dense_h_to_4h,dense_4h_to_h,dense"


def run_train(base, output_dir, *extra, ranks=1, expect_ok=True, launcher=True):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    args = ["--model_name_or_path", str(base), "--output_dir", str(output_dir), *map(str, extra)]
    if launcher:
        command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
                   "--master_port", str(next(PORTS)), str(ROOT / "train.py"), *args]
    else:
        command = [sys.executable, str(ROOT / "train.py"), *args]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if expect_ok:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def read_log(output_dir):
    records = [json.loads(line) for line in Path(output_dir, "train_log.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    return losses, evals


def dev_loss(model, tokenizer, mode, path, batch_size):
    """The mean loss per labelled token over the dev set, as train.py's evaluate() computes it."""
    from utils import DataCollator
    data = InstructionDataset(path, tokenizer, mode, max_len=256, max_src_len=200)
    collate = DataCollator(tokenizer.pad_token_id)
    total = tokens = 0.0
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            batch = collate([data[i] for i in range(start, min(start + batch_size, len(data)))])
            total += model(**batch, reduction="sum").loss.item()
            tokens += (batch["labels"][:, 1:] != -100).sum().item()
    return total / tokens


LEARNING_RATES = {"freeze": 5e-3, "lora": 2e-2, "ptuning": 1e-1, "all": 1e-3}


def common_args(mode, train_type, epochs=2, lr=None):
    args = ["--mode", mode, "--train_type", train_type, "--train_path", ROOT / "data/train.jsonl",
            "--dev_path", ROOT / "data/dev.jsonl", "--max_len", 256, "--max_src_len", 200,
            "--per_device_train_batch_size", 4, "--gradient_accumulation_steps", 2,
            "--learning_rate", lr or LEARNING_RATES[train_type],
            "--num_train_epochs", epochs, "--show_loss_step", 1, "--warmup_ratio", 0.0, "--weight_decay", 0.0]
    if train_type == "lora":
        args += ["--lora_module_name", LORA_MODULES, "--lora_dim", 8, "--lora_alpha", 16, "--lora_dropout", 0.0]
    if train_type == "freeze":
        args += ["--freeze_module_name", "layers.1.,final_layernorm"]
    if train_type == "ptuning":
        args += ["--pre_seq_len", 4, "--prefix_projection", "True"]
    return args


def first_window_loss(mode, base_dir, model, tokenizer, data, batch_size):
    import train
    args = train.parse_args(["--model_name_or_path", str(base_dir), "--mode", mode, "--train_path", str(data),
                             "--output_dir", "-", "--max_len", "256", "--max_src_len", "200",
                             "--per_device_train_batch_size", str(batch_size)])
    dataset, _ = train.build_data(args, tokenizer)
    loader = train.make_loader(dataset, args, 0, 1, True, tokenizer.pad_token_id)
    loader.sampler.set_epoch(0)
    batches = iter(loader)
    window = [next(batches), next(batches)]
    with torch.no_grad():
        total = sum(model(**b, reduction="sum").loss.item() for b in window)
    tokens = sum((b["labels"][:, 1:] != -100).sum().item() for b in window)
    per_batch_means = [model(**b).loss.item() for b in window]
    return total / tokens, sum(per_batch_means) / len(per_batch_means)


def test_loss_is_the_token_mean_of_the_whole_window(tiny_dirs, tmp_path):
    """LoRA starts as the base model (B = 0), so step 1's logged loss is the base model's on the first window: the
    mean over every labelled token of its 2 micro-batches, not the mean of the two batch means."""
    base = tmp_path / "base"
    shutil.copytree(tiny_dirs["glm2"], base)
    weights = load_file(base / "model.safetensors")
    weights["transformer.output_layer.weight"] *= 60  # confident predictions: per-token losses differ widely
    from safetensors.torch import save_file
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    data = tmp_path / "two.jsonl"  # one long and one short answer in the same accumulation window
    data.write_text("\n".join(json.dumps(s, ensure_ascii=False) for s in [
        {"instruction": "抽取三元组：", "input": "发动机水温高", "output": "发动机_部件故障_水温高\n" * 8},
        {"instruction": "抽取三元组：", "input": "风扇低速转动", "output": "风扇"}]))
    out = tmp_path / "out"
    run_train(base, out, *common_args("glm2", "lora", epochs=1), "--train_path", data,
              "--per_device_train_batch_size", 1)
    losses, _ = read_log(out)
    model, tokenizer = load_for_inference("glm2", str(base))
    token_mean, batch_mean = first_window_loss("glm2", base, model, tokenizer, data, 1)
    assert abs(token_mean - batch_mean) > 1e-2  # the two weightings differ on this data
    assert abs(losses[1] - token_mean) < 1e-4 * token_mean


def assert_tensorboard_scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/tokens_per_s", "train/grad_norm", "eval/loss"} <= tags
    assert len(events.Scalars("train/loss")) == 6


def check_merge(mode, base, adapter, unmerged, tokenizer, merged_dir):
    """merge_lora.py on the adapter train.py wrote: the merged model (no PEFT) is base + adapter."""
    result = subprocess.run([sys.executable, str(ROOT / "merge_lora.py"), "--mode", mode, "--ori_model_dir", base,
                             "--model_dir", adapter, "--output_dir", merged_dir], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    merged = MODE[mode].model.from_pretrained(merged_dir, dtype=torch.float32).eval()
    prompt = torch.tensor([template.encode_prompt(tokenizer, mode, "发动机水温高，风扇低速转动。")])
    # fp32 rounding of W + BA, bounded relative to the logits' size as merge_lora.py bounds it
    tolerance = json.loads(Path(merged_dir, "merge_lora.json").read_text())["tolerance"]
    with torch.no_grad():
        assert (merged(prompt).logits - unmerged(prompt).logits).abs().max().item() <= tolerance
        kwargs = dict(max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
        assert merged.generate(input_ids=prompt, **kwargs).tolist() == unmerged.generate(input_ids=prompt,
                                                                                          **kwargs).tolist()


@pytest.mark.parametrize("train_type", TRAIN_TYPES)
@pytest.mark.parametrize("mode", ["glm", "glm2", "glm3", "glm4"])
def test_train_matrix(mode, train_type, tiny_dirs, tmp_path):
    out = tmp_path / "out"
    extra = ["--gradient_checkpointing"] if train_type in ("lora", "ptuning") else []
    result = run_train(tiny_dirs[mode], out, *common_args(mode, train_type), *extra)
    assert "trainable params: " in result.stdout + result.stderr and " || all params: " in result.stdout + result.stderr
    losses, evals = read_log(out)
    steps = sorted(losses)
    assert steps == list(range(1, len(steps) + 1)) and len(steps) == 6
    assert all(l == l for l in losses.values())  # finite, logged every step
    base_model, base_tokenizer = load_for_inference(mode, str(tiny_dirs[mode]))
    initial = dev_loss(base_model, base_tokenizer, mode, ROOT / "data/dev.jsonl", 4)
    assert evals[-1] < initial - 0.005, (initial, evals)  # it learns: the (deterministic) held-out loss falls
    last = out / "epoch-2-step-6"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("epoch")) == ["epoch-1-step-3", "epoch-2-step-6"]
    assert not any(p.name.startswith(".tmp") for p in out.iterdir())
    model, tokenizer = load_for_inference(mode, str(last))
    # the saved checkpoint is the trained model: it reproduces the dev loss train.py measured at the end
    assert abs(dev_loss(model, tokenizer, mode, ROOT / "data/dev.jsonl", 4) - evals[-1]) < 1e-4
    base = load_file(Path(tiny_dirs[mode], "model.safetensors"))
    if train_type in ("freeze", "all"):
        assert_dropin(tiny_dirs[mode], last, TRAIN_EXTRAS)  # the base directory with the trained weights
        saved = load_file(last / "model.safetensors")
        assert set(saved) == set(base)
        changed = {k for k in base if not torch.equal(saved[k], base[k])}
        if train_type == "freeze":  # frozen parameters bit for bit unchanged, the chosen ones trained
            expected = {k for k in base if "layers.1." in k or "final_layernorm" in k}
            assert changed == expected
        else:
            assert len(changed) == len(base)
    elif train_type == "lora":
        assert json.loads((last / "adapter_config.json").read_text())["r"] == 8
        for name, param in model.named_parameters():  # the base under the adapter is the original
            if "lora_" not in name:
                key = name.replace("base_model.model.", "").replace(".base_layer", "")
                assert torch.equal(param.detach(), base[key]), key
        check_merge(mode, tiny_dirs[mode], last, model, tokenizer, tmp_path / "merged")
        assert_tensorboard_scalars(out / "runs")
    else:
        assert set(load_file(last / "prefix_encoder.safetensors")) == {
            "transformer.prefix_encoder.embedding.weight", "transformer.prefix_encoder.trans.0.weight",
            "transformer.prefix_encoder.trans.0.bias", "transformer.prefix_encoder.trans.2.weight",
            "transformer.prefix_encoder.trans.2.bias"}
        assert json.loads((last / "config.json").read_text())["pre_seq_len"] == 4


@pytest.mark.parametrize("mode", ["glm", "glm2", "glm3"])  # glm4: test_glm4_tool_calls_overfit_then_chat_...
def test_overfit_then_chat_returns_the_trained_answer(mode, tiny_dirs, tmp_path):
    samples = [{"instruction": "抽取三元组：", "input": "发动机水温高", "output": "发动机_部件故障_水温高"},
               {"instruction": "抽取三元组：", "input": "风扇低速转动", "output": "风扇_部件故障_低速转动"}]
    data = tmp_path / "few.jsonl"
    data.write_text("\n".join(json.dumps(s, ensure_ascii=False) for s in samples))
    out = tmp_path / "out"
    run_train(tiny_dirs[mode], out, "--mode", mode, "--train_type", "all", "--train_path", data,
              "--max_len", 64, "--max_src_len", 48, "--per_device_train_batch_size", 2,
              "--learning_rate", 3e-3, "--num_train_epochs", 60, "--warmup_ratio", 0.0, "--weight_decay", 0.0,
              "--show_loss_step", 20, "--save_model_step", 1000)
    model, tokenizer = load_for_inference(mode, str(out / "epoch-60-step-60"))
    for sample in samples:
        response, _ = model.chat(tokenizer, sample["instruction"] + sample["input"], do_sample=False,
                                 max_new_tokens=30)
        assert response == sample["output"]


def test_glm4_tool_calls_overfit_then_chat_calls_the_tool_and_answers(tiny_dirs, tmp_path):
    """GLM-4 tool use end to end: data/tools.jsonl (conversations with tools, a tool call and an observation turn)
    trained under the launcher, then chat() with the tools in the history emits the call (stopping at
    <|observation|>) and, given the tool's result as an observation, the trained answer (stopping at <|user|>)."""
    samples = [json.loads(line) for line in (ROOT / "data/tools.jsonl").read_text(encoding="utf-8").splitlines()]
    out = tmp_path / "out"
    run_train(tiny_dirs["glm4"], out, "--mode", "glm4", "--train_type", "all", "--train_path", ROOT / "data/tools.jsonl",
              "--max_len", 512, "--max_src_len", 480, "--per_device_train_batch_size", 1,
              "--learning_rate", 3e-3, "--num_train_epochs", 60, "--warmup_ratio", 0.0, "--weight_decay", 0.0,
              "--show_loss_step", 20, "--save_model_step", 1000)
    model, tokenizer = load_for_inference("glm4", str(out / "epoch-60-step-120"))
    for sample in samples:
        system, user, call, observation, answer = sample["conversations"]
        response, history = model.chat(tokenizer, user["content"], history=[system], do_sample=False,
                                       max_new_tokens=40)
        assert response == {"name": call["metadata"], "content": call["content"]}
        assert history[-1] == {"role": "assistant", "metadata": call["metadata"], "content": call["content"]}
        response, _ = model.chat(tokenizer, observation["content"], history=history, role="observation",
                                 do_sample=False, max_new_tokens=60)
        assert response == answer["content"]


@pytest.mark.parametrize("ds_file", ["ds_zero2_no_offload.json", "ds_zero3_offload.json"])
def test_two_ranks(ds_file, tiny_dirs, tmp_path):
    out = tmp_path / "out"
    run_train(tiny_dirs["glm3"], out, *common_args("glm3", "all", epochs=1), "--ds_file", ROOT / ds_file,
              "--per_device_train_batch_size", 2, ranks=2)
    losses, evals = read_log(out)
    assert len(losses) == 3  # 24 samples / (2 per rank x 2 ranks x 2 accumulation)
    model, tokenizer = load_for_inference("glm3", str(out / "epoch-1-step-3"))
    assert abs(dev_loss(model, tokenizer, "glm3", ROOT / "data/dev.jsonl", 2) - evals[-1]) < 1e-4


def test_resume_reproduces_the_uninterrupted_run(tiny_dirs, tmp_path):
    args = common_args("glm2", "lora", epochs=2) + ["--save_model_step", 2, "--lora_dropout", 0.1]
    full = tmp_path / "full"
    run_train(tiny_dirs["glm2"], full, *args)
    losses, _ = read_log(full)
    # A run stopped right after its step-2 checkpoint: what it would have left behind.
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copytree(full / "epoch-1-step-2", cut / "epoch-1-step-2")
    (cut / "train_log.jsonl").write_text("".join(json.dumps({"step": s, "loss": losses[s]}) + "\n" for s in (1, 2)))
    run_train(tiny_dirs["glm2"], cut, *args, "--resume")
    resumed, _ = read_log(cut)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in (3, 4, 5, 6):  # mid-epoch position, optimizer, scheduler and dropout RNG all restored
        assert abs(resumed[step] - losses[step]) < 1e-6, (step, resumed[step], losses[step])


@pytest.mark.parametrize("mode", ["glm", "glm2", "glm3", "glm4"])
def test_labels_cover_exactly_the_answer_and_its_end_token(mode, tiny_dirs, tmp_path):
    tokenizer = MODE[mode].tokenizer.from_pretrained(tiny_dirs[mode])
    sample = {"instruction": "你现在是一个信息抽取模型。文本：", "input": "发动机水温高",
              "output": "发动机_部件故障_水温高\n风扇_部件故障_低速转动"}
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(sample, ensure_ascii=False))
    example = InstructionDataset(str(path), tokenizer, mode, max_len=256, max_src_len=200)[0]
    labelled = [t for t in example["labels"] if t != -100]
    answer = tokenizer.encode_text(sample["output"])
    end = tokenizer.eos_token_id
    if mode == "glm3":  # the assistant turn is "\n" (empty metadata line) + the answer
        answer = tokenizer.encode_text("\n") + answer
    if mode == "glm4":  # "\n" + answer as one text, then <|user|> (THUDM's GLM-4 finetune_demo)
        answer, end = tokenizer.encode_text("\n" + sample["output"]), tokenizer.get_command("<|user|>")
    assert labelled == answer + [end]
    assert tokenizer.decode(labelled[:-1]).strip() == sample["output"]
    first = example["labels"].index(labelled[0])
    assert all(t == -100 for t in example["labels"][:first])
    assert example["input_ids"][first:] == labelled


@pytest.mark.parametrize("mode,all_turns", [("glm2", True), ("glm2", False), ("glm3", True), ("glm3", False),
                                            ("glm4", True), ("glm4", False)])
def test_multi_turn_labels(mode, all_turns, tiny_dirs):
    tokenizer = MODE[mode].tokenizer.from_pretrained(tiny_dirs[mode])
    data = InstructionDataset(str(ROOT / "data/multiturn.jsonl"), tokenizer, mode, 512, 400,
                              learn_all_turns=all_turns)
    first = json.loads((ROOT / "data/multiturn.jsonl").read_text().splitlines()[0])
    labelled = tokenizer.decode([t for t in data[0]["labels"] if t != -100])
    assert first["output"] in labelled
    for _, old_answer in first["history"]:
        assert (old_answer in labelled) == all_turns


def test_shared_user_data_tokenises_for_every_mode(tiny_dirs, capsys):
    path = shared_path("data", "spo_train.jsonl")
    lines = sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    for mode in ("glm", "glm2", "glm3", "glm4"):
        tokenizer = MODE[mode].tokenizer.from_pretrained(tiny_dirs[mode])
        data = InstructionDataset(str(path), tokenizer, mode, max_len=1560, max_src_len=1024)
        assert data.stats.samples == lines == len(data)
        assert all(len(e["input_ids"]) <= 1560 for e in data.examples)
        with capsys.disabled():
            print(f"\n{path.name} [{mode}, tiny tokenizer]: {lines} samples, {data.stats.truncated} truncated "
                  f"at max_len 1560 / max_src_len 1024")


# ---------------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content,message", [
    ('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n', "bad.jsonl:2: Expecting value"),
    ('{"instruction": "a", "input": "b"}\n', "bad.jsonl:1: sample has no 'output'"),
    ('{"instruction": "a", "output": 3}\n', "bad.jsonl:1: 'output' must be a string"),
])
def test_bad_data_stops_before_training(content, message, tiny_dirs, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    result = run_train(tiny_dirs["glm3"], tmp_path / "out", "--mode", "glm3", "--train_path", bad,
                       expect_ok=False, launcher=False)
    assert result.returncode != 0
    assert message in result.stderr
    assert not (tmp_path / "out" / "runs").exists()


def test_no_usable_sample_after_skipping(tiny_dirs, tmp_path):
    result = run_train(tiny_dirs["glm3"], tmp_path / "out", "--mode", "glm3", "--train_path",
                       ROOT / "data/train.jsonl", "--max_len", 12, "--max_src_len", 8, "--is_skip",
                       expect_ok=False, launcher=False)
    assert result.returncode != 0 and "no usable sample" in result.stderr


@pytest.mark.parametrize("flag,value", [("--mode", "glm5"), ("--train_type", "qlora")])
def test_bad_choices_list_the_valid_ones(flag, value, tiny_dirs, tmp_path):
    args = {"--mode": "glm3", "--train_type": "lora", flag: value}
    result = run_train(tiny_dirs["glm3"], tmp_path / "out", "--train_path", ROOT / "data/train.jsonl",
                       *[item for pair in args.items() for item in pair], expect_ok=False, launcher=False)
    choices = "glm, glm2, glm3, glm4" if flag == "--mode" else "freeze, lora, ptuning, all"
    assert result.returncode == 2 and f"invalid choice: '{value}'" in result.stderr
    assert all(choice in result.stderr for choice in choices.split(", "))
    assert not (tmp_path / "out").exists()


def test_refuses_a_non_empty_output_dir(tiny_dirs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = run_train(tiny_dirs["glm3"], out, "--mode", "glm3", "--train_path", ROOT / "data/train.jsonl",
                       expect_ok=False, launcher=False)
    assert result.returncode != 0 and "--resume" in result.stderr
    assert (out / "keep.txt").read_text() == "precious"


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_dirs, tmp_path):
    out = tmp_path / "out"
    result = run_train(tiny_dirs["glm2"], out, *common_args("glm2", "all", epochs=2, lr=1e30),
                       "--save_model_step", 1, "--ds_file", ROOT / "tests/ds_no_clipping.json", expect_ok=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "step 2: loss is nan" in output or "step 2: loss is inf" in output
    assert (out / "epoch-1-step-1" / "model.safetensors").exists()
    assert not (out / "epoch-1-step-2").exists()


def test_every_epoch_a_new_order_the_same_on_every_rank(tiny_dirs):
    import train
    tokenizer = MODE["glm3"].tokenizer.from_pretrained(tiny_dirs["glm3"])
    args = train.parse_args(["--model_name_or_path", "-", "--mode", "glm3", "--train_path",
                             str(ROOT / "data/train.jsonl"), "--output_dir", "-", "--max_len", "256",
                             "--max_src_len", "200", "--per_device_train_batch_size", "2"])
    dataset, _ = train.build_data(args, tokenizer)
    for group_by_length in (False, True):
        args.group_by_length = group_by_length
        orders = {}
        for rank in (0, 1):
            loader = train.make_loader(dataset, args, rank, 2, True, tokenizer.pad_token_id)
            for epoch in (0, 1):
                loader.sampler.set_epoch(epoch)
                orders[rank, epoch] = [tuple(ids) for b in loader for ids in b["input_ids"].tolist()]
        for epoch in (0, 1):  # the ranks split the data between them
            assert not set(orders[0, epoch]) & set(orders[1, epoch])
            assert len(orders[0, epoch]) + len(orders[1, epoch]) == len(dataset)
        assert orders[0, 0] != orders[0, 1]  # and see it in a new order every epoch


def test_dev_set_is_labelled_like_the_training_set(tiny_dirs):
    import train
    tokenizer = MODE["glm3"].tokenizer.from_pretrained(tiny_dirs["glm3"])
    path = str(ROOT / "data/multiturn.jsonl")
    for last_only in (False, True):
        argv = ["--model_name_or_path", "-", "--mode", "glm3", "--train_path", path, "--dev_path", path,
                "--output_dir", "-", "--max_len", "512", "--max_src_len", "400"] + (["--last_turn_only"] * last_only)
        train_set, dev_set = train.build_data(train.parse_args(argv), tokenizer)
        assert [e["labels"] for e in dev_set.examples] == [e["labels"] for e in train_set.examples]
