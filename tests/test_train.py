"""train.py end to end on tiny checkpoints, on the CPU under the deepspeed launcher (DS_ACCELERATOR=cpu, gloo)."""
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, free_port, one_rank_env, shared_path
from dropin_checks import TRAIN_EXTRAS, assert_dropin
from model import MODE, template
from dataset import InstructionDataset
from inference import load_for_inference

LORA_MODULES = "query_key_value,dense_h_to_4h,dense_4h_to_h,dense"


def run_train(base, output_dir, *extra, ranks=1, expect_ok=True, launcher=None, timeout=900):
    """train.py in its own process: under the deepspeed launcher for several ranks (or with launcher=True), else as
    `python train.py` (a world of one, as train.py allows without the launcher: one Python start instead of three,
    ~1 minute less per run on a loaded 2-core machine)."""
    launcher = ranks > 1 if launcher is None else launcher
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    args = ["--model_name_or_path", str(base), "--output_dir", str(output_dir), *map(str, extra)]
    port = free_port()
    if launcher:
        command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
                   "--master_port", str(port), str(ROOT / "train.py"), *args]
    else:
        env["MASTER_PORT"] = str(port)
        command = [sys.executable, str(ROOT / "train.py"), *args]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if expect_ok:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # DeepSpeed's CPU all-reduce buffers (66 MB of RAM per rank) are gone with the processes
    assert not shm_buffers(port), shm_buffers(port)
    return result


def shm_buffers(port):
    return sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))


def read_log(output_dir):
    records = [json.loads(line) for line in Path(output_dir, "train_log.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    return losses, evals


def dev_loss(model, tokenizer, mode, path, batch_size):
    """The mean loss per labelled token over the dev set, as train.py's evaluate() computes it."""
    from dataset import DataCollator
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
    loader.batch_sampler.set_epoch(0)
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
    """merge_lora.py (its main, in this process) on the adapter train.py wrote: the merged model (no PEFT) is base +
    adapter."""
    import merge_lora
    assert merge_lora.main(["--mode", mode, "--ori_model_dir", str(base), "--model_dir", str(adapter),
                            "--output_dir", str(merged_dir)]) == 0
    merged = MODE[mode].model.from_pretrained(merged_dir, dtype=torch.float32).eval()
    prompt = torch.tensor([template.encode_prompt(tokenizer, mode, "发动机水温高，风扇低速转动。")])
    # fp32 rounding of W + BA, bounded relative to the logits' size as merge_lora.py bounds it
    tolerance = json.loads(Path(merged_dir, "merge_lora.json").read_text())["tolerance"]
    with torch.no_grad():
        assert (merged(prompt).logits - unmerged(prompt).logits).abs().max().item() <= tolerance
        kwargs = dict(max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
        assert merged.generate(input_ids=prompt, **kwargs).tolist() == unmerged.generate(input_ids=prompt,
                                                                                          **kwargs).tolist()


# One case per code path rather than every mode x train type: each train type on both model files (ChatGLM-6B's
# modeling_chatglm.py; modeling_chatglm2.py for glm2, glm3 and glm4, which differ in config and template, and whose
# data paths the label tests below cover mode by mode), every mode at least once. train.main in this process (a
# world of one; test_smoke and test_two_ranks run the launcher).
MATRIX = [("glm", "freeze"), ("glm", "lora"), ("glm", "ptuning"), ("glm", "all"), ("glm2", "ptuning"),
          ("glm3", "lora"), ("glm4", "freeze"), ("glm4", "all")]


@pytest.mark.parametrize("mode,train_type", MATRIX, ids=[f"{m}-{t}" for m, t in MATRIX])
def test_train_matrix(mode, train_type, tiny_dirs, tmp_path, train_in_process, caplog):
    out = tmp_path / "out"
    extra = ["--gradient_checkpointing"] if train_type in ("lora", "ptuning") else []
    caplog.set_level(logging.INFO)
    train_in_process(*tiny_run_args(mode, train_type, tiny_dirs[mode], out, epochs=2), *extra)
    assert "trainable params: " in caplog.text and " || all params: " in caplog.text
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
    # output_dir/latest: a relative link to the newest checkpoint, which inference loads through it
    assert (out / "latest").is_symlink() and os.readlink(out / "latest") == last.name
    model, tokenizer = load_for_inference(mode, str(out / "latest"))
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
def test_overfit_then_chat_returns_the_trained_answer(mode, tiny_dirs, tmp_path, train_in_process):
    samples = [{"instruction": "抽取三元组：", "input": "发动机水温高", "output": "发动机_部件故障_水温高"},
               {"instruction": "抽取三元组：", "input": "风扇低速转动", "output": "风扇_部件故障_低速转动"}]
    data = tmp_path / "few.jsonl"
    data.write_text("\n".join(json.dumps(s, ensure_ascii=False) for s in samples))
    out = tmp_path / "out"
    train_in_process("--model_name_or_path", tiny_dirs[mode], "--output_dir", out, "--mode", mode, "--train_type",
                     "all", "--train_path", data,
              "--max_len", 64, "--max_src_len", 48, "--per_device_train_batch_size", 2,
                     # peak 6e-3 decaying linearly: on average the 3e-3 a constant schedule would give
                     "--learning_rate", 6e-3, "--num_train_epochs", 60, "--warmup_ratio", 0.0, "--weight_decay", 0.0,
                     "--show_loss_step", 20, "--save_model_step", 1000)
    model, tokenizer = load_for_inference(mode, str(out / "epoch-60-step-60"))
    for sample in samples:
        response, _ = model.chat(tokenizer, sample["instruction"] + sample["input"], do_sample=False,
                                 max_new_tokens=30)
        assert response == sample["output"]


def test_glm4_tool_calls_overfit_then_chat_calls_the_tool_and_answers(tiny_dirs, tmp_path, train_in_process):
    """GLM-4 tool use end to end: data/tools.jsonl (conversations with tools, a tool call and an observation turn)
    trained by train.main, then chat() with the tools in the history emits the call (stopping at
    <|observation|>) and, given the tool's result as an observation, the trained answer (stopping at <|user|>)."""
    samples = [json.loads(line) for line in (ROOT / "data/tools.jsonl").read_text(encoding="utf-8").splitlines()]
    out = tmp_path / "out"
    train_in_process("--model_name_or_path", tiny_dirs["glm4"], "--output_dir", out, "--mode", "glm4", "--train_type",
                     "all", "--train_path", ROOT / "data/tools.jsonl",
              "--max_len", 512, "--max_src_len", 480, "--per_device_train_batch_size", 1,
                     "--learning_rate", 3e-3, "--num_train_epochs", 60, "--warmup_ratio", 0.0, "--weight_decay", 0.0,
                     "--show_loss_step", 20, "--save_model_step", 1000)
    model, tokenizer = load_for_inference("glm4", str(out / "epoch-60-step-120"))
    for sample in samples:
        system, user, call, observation, answer = sample["conversations"]
        response, history = model.chat(tokenizer, user["content"], history=[system], do_sample=False,
                                       max_new_tokens=40)
        # chat() returns the call with its arguments read ("parameters"), as the official chat() does with tools
        assert response == {"name": call["metadata"], "content": call["content"],
                            "parameters": json.loads(call["content"])}
        assert history[-1] == {"role": "assistant", "metadata": call["metadata"], "content": call["content"]}
        response, _ = model.chat(tokenizer, observation["content"], history=history, role="observation",
                                 do_sample=False, max_new_tokens=60)
        assert response == answer["content"]


@pytest.mark.parametrize("ds_file", ["ds_zero2_no_offload.json", "ds_zero3_offload.json",
                                     "ds_zero3_offload_optimizer.json"])
def test_two_ranks(ds_file, tiny_dirs, tmp_path):
    """Training on 2 ranks; the eval loss over an odd-sized dev set (one rank gets a padding sample) equals the one
    process evaluation of the saved model: no sample counted twice. 21 training samples in global batches of 4: the
    last holds one sample, rank 1's share is empty (a row of padding without labels, dataset.EpochBatches), and
    every sample trains once (the loader used to drop the last sample, the sampler 1 more)."""
    out = tmp_path / "out"
    dev = tmp_path / "dev5.jsonl"
    dev.write_text("".join((ROOT / "data/dev.jsonl").read_text().splitlines(keepends=True)[:5]))
    train_path = tmp_path / "train21.jsonl"
    train_path.write_text("".join((ROOT / "data/train.jsonl").read_text().splitlines(keepends=True)[:21]))
    run_train(tiny_dirs["glm3"], out, *common_args("glm3", "all", epochs=1), "--ds_file", ROOT / ds_file,
              "--per_device_train_batch_size", 2, "--dev_path", dev, "--train_path", train_path, ranks=2)
    losses, evals = read_log(out)
    assert len(losses) == 3  # 6 micro-batches a rank (2 per rank x 2 ranks; the 6th: 1 sample and none), 2 a step
    model, tokenizer = load_for_inference("glm3", str(out / "epoch-1-step-3"))
    assert abs(dev_loss(model, tokenizer, "glm3", dev, 2) - evals[-1]) < 1e-5
    # the logged tokens are both ranks' real ones (not rank 0's times 2): each of the 21 samples once
    data = InstructionDataset(str(train_path), tokenizer, "glm3", max_len=256, max_src_len=200)
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert sum(r["tokens"] for r in records if "tokens" in r) == sum(len(e["input_ids"]) for e in data.examples)


@pytest.fixture(scope="module")
def uninterrupted(tiny_dirs, tmp_path_factory):
    """3 epochs of 3 steps with LoRA dropout (so the random state matters), a checkpoint every 2 steps and an eval
    every 3: checkpoints at steps 2 (mid-epoch), 3 (epoch end), 6 (--save_model_step on an epoch's last step) ..."""
    args = [*common_args("glm2", "lora", epochs=3), "--save_model_step", 2, "--eval_step", 3, "--lora_dropout", 0.1]
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    run_train(tiny_dirs["glm2"], out, *args)
    return args, out


@pytest.mark.parametrize("tag", ["epoch-1-step-2", "epoch-1-step-3", "epoch-2-step-6"])
def test_resume_reproduces_the_uninterrupted_run(tag, uninterrupted, tiny_dirs, tmp_path):
    args, full = uninterrupted
    losses, _ = read_log(full)
    stop = int(tag.rsplit("-", 1)[1])
    # A run stopped right after this checkpoint: what it would have left behind.
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copytree(full / tag, cut / tag)
    (cut / "train_log.jsonl").write_text("".join(json.dumps({"step": s, "loss": losses[s]}) + "\n"
                                                 for s in range(1, stop + 1)))
    run_train(tiny_dirs["glm2"], cut, *args, "--resume")
    resumed, _ = read_log(cut)
    assert sorted(resumed) == list(range(1, 10))
    for step in range(stop + 1, 10):  # data position, optimizer, scheduler and dropout RNG all restored
        assert abs(resumed[step] - losses[step]) < 1e-6, (tag, step, resumed[step], losses[step])
    assert (cut / "epoch-3-step-9" / "adapter_model.safetensors").exists()
    assert not [p.name for p in cut.iterdir() if p.name.startswith(".tmp")]


def test_eval_runs_once_per_step(uninterrupted):
    """--eval_step 3 falls on every epoch's last step: one evaluation there, not two."""
    _, full = uninterrupted
    records = [json.loads(line) for line in (full / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_loss" in r] == [3, 6, 9]


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
    if mode == "glm2":  # the answer continues the prompt string, as chat() encodes history: no dummy-prefix "▁"
        prompt = f"[Round 1]\n\n问：{sample['instruction'] + sample['input']}\n\n答："
        answer = tokenizer.encode_text(prompt + sample["output"])[len(tokenizer.encode_text(prompt)):]
        assert tokenizer.convert_ids_to_tokens(answer[0]) != "▁"
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
                       expect_ok=False)
    assert result.returncode != 0
    assert message in result.stderr
    assert not (tmp_path / "out" / "runs").exists()


def test_no_usable_sample_after_skipping(tiny_dirs, tmp_path):
    result = run_train(tiny_dirs["glm3"], tmp_path / "out", "--mode", "glm3", "--train_path",
                       ROOT / "data/train.jsonl", "--max_len", 12, "--max_src_len", 8, "--is_skip",
                       expect_ok=False)
    assert result.returncode != 0 and "no usable sample" in result.stderr


@pytest.mark.parametrize("flag,value", [("--mode", "glm5"), ("--train_type", "qlora")])
def test_bad_choices_list_the_valid_ones(flag, value, tiny_dirs, tmp_path):
    args = {"--mode": "glm3", "--train_type": "lora", flag: value}
    result = run_train(tiny_dirs["glm3"], tmp_path / "out", "--train_path", ROOT / "data/train.jsonl",
                       *[item for pair in args.items() for item in pair], expect_ok=False)
    choices = "glm, glm2, glm3, glm4" if flag == "--mode" else "freeze, lora, ptuning, all"
    assert result.returncode == 2 and f"invalid choice: '{value}'" in result.stderr
    assert all(choice in result.stderr for choice in choices.split(", "))
    assert not (tmp_path / "out").exists()


def test_refuses_a_non_empty_output_dir(tiny_dirs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = run_train(tiny_dirs["glm3"], out, "--mode", "glm3", "--train_path", ROOT / "data/train.jsonl",
                       expect_ok=False)
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
                loader.batch_sampler.set_epoch(epoch)
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


# ---------------------------------------------------------------------------------------------------------------
# what a real run does, watched from inside: train.main() in this process, a world of one
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def train_in_process(monkeypatch, one_thread):
    """train.main(argv) in this process (gloo, one rank), so that a test can count what the real path runs. The
    process group stays up for the next such run (DeepSpeed keeps references to it)."""
    import train

    def run(*argv):
        one_rank_env(monkeypatch)
        return train.main([str(a) for a in argv])
    return run


@pytest.fixture
def deepspeed_engines(monkeypatch):
    """The engines deepspeed.initialize returns while the test runs (train.py's own, in this process)."""
    import deepspeed
    engines = []
    real_initialize = deepspeed.initialize

    def initialize(*args, **kwargs):
        result = real_initialize(*args, **kwargs)
        engines.append(result[0])
        return result

    monkeypatch.setattr(deepspeed, "initialize", initialize)
    return engines


def tiny_run_args(mode, train_type, base, out, epochs=1):
    return [*common_args(mode, train_type, epochs), "--model_name_or_path", base, "--output_dir", out]


def test_offload_that_cannot_fit_the_host_stops_in_one_line_before_deepspeed_allocates(
        tiny_dirs, tmp_path, monkeypatch, train_in_process, deepspeed_engines, real_f_linear):
    """Full training under ds_zero3_offload_optimizer.json pins 16 bytes of optimizer state per trainable parameter
    in host memory. Where the node has less available, train.py names the JSON and both sizes and stops before
    deepspeed.initialize, instead of being killed minutes later with no message; where it fits, it logs them."""
    import types

    import psutil

    import train

    out = tmp_path / "out"
    args = [*tiny_run_args("glm3", "all", tiny_dirs["glm3"], out), "--ds_file", ROOT / "ds_zero3_offload_optimizer.json",
            "--max_steps", 1]
    seen = []
    real_need = train.offloaded_host_bytes
    monkeypatch.setattr(train, "offloaded_host_bytes", lambda *a: seen.append(real_need(*a)) or seen[-1])
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=1 << 20))
    with pytest.raises(SystemExit) as stop:
        train_in_process(*args)
    message = str(stop.value)
    assert "--ds_file" in message and "ds_zero3_offload_optimizer.json" in message and "GiB" in message
    assert "\n" not in message and deepspeed_engines == [] and not list(out.iterdir())
    parameters = sum(p.numel() for p in load_for_inference("glm3", tiny_dirs["glm3"])[0].parameters())
    assert seen == [16 * parameters]  # every parameter trains; the whole optimizer is offloaded, on one rank

    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=1 << 40))
    train_in_process(*args, "--output_dir", tmp_path / "fits")  # the same run where the host holds it
    assert len(deepspeed_engines) == 1


def test_training_runs_in_train_mode_with_checkpointing_and_dropout(tiny_dirs, tmp_path, monkeypatch,
                                                                    train_in_process):
    """--gradient_checkpointing: in the first step every block is called in training mode, the inside of each block
    (its MLP) runs twice per micro-batch (once more when backward recomputes it), and the LoRA dropout drops."""
    from model import modeling_chatglm2
    blocks, mlps, dropouts = [], [], []
    real_mlp, real_dropout = modeling_chatglm2.MLP.forward, torch.nn.Dropout.forward

    def mlp_forward(self, x):
        mlps.append(self.training)
        return real_mlp(self, x)

    def dropout_forward(self, x):
        out = real_dropout(self, x)
        if self.p == 0.3:  # the LoRA dropout of this run
            dropouts.append((self.training, (out == 0).float().mean().item()))
        return out

    def block_called(module, args):  # module calls, outside the checkpoint: once per micro-batch
        if isinstance(module, modeling_chatglm2.GLMBlock):
            blocks.append(module.training)

    monkeypatch.setattr(modeling_chatglm2.MLP, "forward", mlp_forward)
    monkeypatch.setattr(torch.nn.Dropout, "forward", dropout_forward)
    hook = torch.nn.modules.module.register_module_forward_pre_hook(block_called)
    try:
        train_in_process(*tiny_run_args("glm2", "lora", tiny_dirs["glm2"], tmp_path / "out"), "--lora_dropout", 0.3,
                         "--gradient_checkpointing", "--max_steps", 1)
    finally:
        hook.remove()
    layers = json.loads(Path(tiny_dirs["glm2"], "config.json").read_text())["num_layers"]
    micro_batches = 2  # --gradient_accumulation_steps 2, one step
    # transformers >= 5.24 checkpoints a layer's forward, so module hooks see one call per micro-batch; 5.17-5.23
    # checkpoint __call__, so the recompute in backward passes the hooks again. The MLP count below is the proof of
    # the recompute on every release.
    # the run ends with an evaluation on the dev set (every run with one does): its calls come last, in eval mode
    def training_calls(calls):
        count = calls.index(False) if False in calls else len(calls)
        assert not any(calls[count:]), calls
        return calls[:count]
    blocks, mlps = training_calls(blocks), training_calls(mlps)
    assert len(blocks) in (layers * micro_batches, 2 * layers * micro_batches), blocks
    assert len(mlps) == layers * micro_batches * 2, mlps
    dropouts = dropouts[:len(training_calls([training for training, _ in dropouts]))]
    assert dropouts
    dropped = sum(share for _, share in dropouts) / len(dropouts)
    assert 0.2 < dropped < 0.4, dropped


def test_weight_decay_spares_norm_weights_and_biases(tiny_dirs, tmp_path, train_in_process, deepspeed_engines):
    train_in_process(*tiny_run_args("glm2", "all", tiny_dirs["glm2"], tmp_path / "out"), "--weight_decay", 0.1,
                     "--max_steps", 1)
    engine = deepspeed_engines[0]
    names = {id(p): n for n, p in engine.module.named_parameters()}
    decay = {group["weight_decay"]: {names[id(p)] for p in params}  # what the optimizer holds, per group
             for group, params in zip(engine.optimizer.optimizer.param_groups, engine.optimizer.bit16_groups)}
    assert set(decay) == {0.1, 0.0}
    shapes = {n: p.dim() for n, p in engine.module.named_parameters()}
    assert decay[0.1] == {n for n, d in shapes.items() if d >= 2}
    assert decay[0.0] == {n for n, d in shapes.items() if d == 1}
    assert "transformer.encoder.layers.0.input_layernorm.weight" in decay[0.0]
    assert "transformer.encoder.layers.0.self_attention.query_key_value.bias" in decay[0.0]


def test_zero_buckets_are_sized_to_the_trainable_parameters(tiny_dirs, tmp_path, train_in_process,
                                                           deepspeed_engines):
    """ds_zero2_no_offload.json's "auto" buckets: a LoRA run's are as large as its trainable parameters (DeepSpeed
    allocates them in full on every backward; its default is 5e8 elements, 1.9 GiB in bf16); a number is kept."""
    import train
    train_in_process(*tiny_run_args("glm2", "lora", tiny_dirs["glm2"], tmp_path / "out"), "--max_steps", 1,
                     "--ds_file", ROOT / "ds_zero2_no_offload.json")
    engine = deepspeed_engines[0]
    trainable = sum(p.numel() for p in engine.module.parameters() if p.requires_grad)
    assert 0 < trainable < 10 ** 6
    assert engine.optimizer.reduce_bucket_size == trainable
    assert engine.zero_allgather_bucket_size() == trainable
    config = {"zero_optimization": {"stage": 2, "reduce_bucket_size": 12345}}
    train.size_buckets(config, engine.module)
    assert config["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 12345, "allgather_bucket_size": trainable}


def test_compile_runs_the_blocks_compiled_and_trains_as_eager(tiny_dirs, tmp_path, monkeypatch, train_in_process):
    """--compile: every call of a block's MLP (forward, its recomputation in backward, evaluation) runs a compiled
    graph, and the run (inductor, the default backend) logs the eager run's losses."""
    from model import modeling_chatglm2

    def run(name, *extra):
        out = tmp_path / name
        train_in_process(*tiny_run_args("glm2", "lora", tiny_dirs["glm2"], out), "--gradient_checkpointing",
                         "--max_steps", 2, "--eval_step", 2, *extra)
        return read_log(out)

    eager_mlp_calls = []
    real_mlp = modeling_chatglm2.MLP.forward
    with monkeypatch.context() as patch:
        patch.setattr(modeling_chatglm2.MLP, "forward", lambda self, x: eager_mlp_calls.append(1) or real_mlp(self, x))
        eager = run("eager")
    layers = json.loads(Path(tiny_dirs["glm2"], "config.json").read_text())["num_layers"]
    assert len(eager_mlp_calls) >= layers * 2 * 2 * 2  # 2 steps of 2 micro-batches, forward and recomputation

    graph_calls = []  # a backend that counts the calls of each graph torch.compile hands it

    def counting_backend(graph, example_inputs):
        is_mlp = "dense_4h_to_h" in graph.code
        return lambda *args: graph_calls.append(is_mlp) or graph.forward(*args)

    real_compile = torch.nn.Module.compile
    with monkeypatch.context() as patch:
        patch.setattr(torch.nn.Module, "compile", lambda self, **kw: real_compile(self, backend=counting_backend))
        counted = run("counted", "--compile")
    assert sum(graph_calls) == len(eager_mlp_calls)  # each MLP call was a compiled graph's, none ran eagerly
    assert counted == eager  # the graphs themselves, run as captured, compute what eager does

    compiled = run("compiled", "--compile")  # inductor's kernels: the same losses up to fp32 rounding
    assert compiled[0].keys() == eager[0].keys() == {1, 2}
    for step, loss in eager[0].items():
        assert compiled[0][step] == pytest.approx(loss, rel=1e-5)
    assert len(eager[1]) == 1 and compiled[1] == pytest.approx(eager[1], rel=1e-5)  # the dev loss at step 2


def test_tokens_per_second_counts_real_tokens_over_step_time_only(tiny_dirs, tmp_path, monkeypatch,
                                                                  train_in_process):
    """Slow evaluations and saves after every step do not enter the logged step time; the logged tokens are the
    samples' own tokens, padding excluded. train.py's clock (time.perf_counter) runs 1000 s ahead during each
    evaluation and save, so the check does not depend on how fast the machine steps."""
    import types

    import train
    real_evaluate, real_save = train.evaluate, train.save_checkpoint
    skipped = [0.0]
    monkeypatch.setattr(train, "time", types.SimpleNamespace(perf_counter=lambda: time.perf_counter() + skipped[0]))

    def slow_evaluate(*args, **kwargs):
        skipped[0] += 1000.0
        return real_evaluate(*args, **kwargs)

    def slow_save(*args, **kwargs):
        skipped[0] += 1000.0
        return real_save(*args, **kwargs)

    monkeypatch.setattr(train, "evaluate", slow_evaluate)
    monkeypatch.setattr(train, "save_checkpoint", slow_save)
    out = tmp_path / "out"
    train_in_process(*tiny_run_args("glm2", "lora", tiny_dirs["glm2"], out), "--eval_step", 1,
                     "--save_model_step", 1)
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 3 and all(r["seconds"] < 1000 for r in steps) and skipped[0] >= 6000, steps
    assert all(abs(r["tokens_per_s"] - r["tokens"] / r["seconds"]) < 1e-6 * r["tokens_per_s"] for r in steps)
    tokenizer = MODE["glm2"].tokenizer.from_pretrained(tiny_dirs["glm2"])
    data = InstructionDataset(str(ROOT / "data/train.jsonl"), tokenizer, "glm2", max_len=256, max_src_len=200)
    assert sum(r["tokens"] for r in steps) == sum(len(e["input_ids"]) for e in data.examples)  # each sample once


def test_save_total_limit_keeps_the_newest_checkpoints(tiny_dirs, tmp_path, train_in_process):
    out = tmp_path / "out"
    train_in_process(*tiny_run_args("glm2", "lora", tiny_dirs["glm2"], out, epochs=2), "--save_model_step", 1,
                     "--save_total_limit", 2)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("epoch", ".tmp"))) == \
        ["epoch-2-step-5", "epoch-2-step-6"]
    assert os.readlink(out / "latest") == "epoch-2-step-6"  # the newest, replaced at each save, never pruned


@pytest.mark.parametrize("mode,conversation,message", [
    ("glm2", [{"role": "user", "content": "查天气"}, {"role": "assistant", "content": "好"},
              {"role": "observation", "content": "晴"}, {"role": "assistant", "content": "晴天"}],
     "role 'observation' is only supported by --mode glm3"),
    ("glm", [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好"},
             {"role": "assistant", "content": "再见"}], "two assistant turns in a row"),
    ("glm2", [{"role": "assistant", "content": "你好"}, {"role": "user", "content": "你好"},
              {"role": "assistant", "content": "再见"}], "starts with an assistant turn"),
])
def test_conversations_the_template_cannot_hold_name_file_and_line(mode, conversation, message, tiny_dirs, tmp_path,
                                                                    train_in_process):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" +
                   json.dumps({"conversations": conversation}, ensure_ascii=False) + "\n")
    with pytest.raises(SystemExit) as error:
        train_in_process(*tiny_run_args(mode, "lora", tiny_dirs[mode], tmp_path / "out"), "--train_path", bad)
    assert str(error.value).startswith(f"{bad}:2: ") and message in str(error.value)


# ---------------------------------------------------------------------------------------------------------------
# the learning-rate schedule, as the optimizer used it
# ---------------------------------------------------------------------------------------------------------------
T = 12  # 24 samples, 2 per micro-batch, no accumulation, one epoch
SCHEDULES = {  # the README's formula lr_s = peak * min(s / W, (T + 1 - s) / (T - W)), W = ceil(ratio * T), written out
    0.0: [(T + 1 - s) / T for s in range(1, T + 1)],  # W = 0: the peak at step 1, then down to peak / 12
    0.1: [1 / 2, 1] + [(T + 1 - s) / 10 for s in range(3, T + 1)],  # W = 2
    0.5: [s / 6 for s in range(1, 7)] + [(T + 1 - s) / 6 for s in range(7, T + 1)],  # W = 6
}


@pytest.mark.parametrize("ratio", sorted(SCHEDULES))
def test_learning_rate_of_every_step(ratio, tiny_dirs, tmp_path, train_in_process):
    out, peak = tmp_path / "out", 1e-3
    train_in_process(*tiny_run_args("glm2", "lora", tiny_dirs["glm2"], out), "--per_device_train_batch_size", 2,
                     "--gradient_accumulation_steps", 1, "--warmup_ratio", ratio, "--learning_rate", peak)
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    used = [r["lr"] for r in records if "lr" in r]  # the optimizer's lr during each step, read from the engine
    assert len(used) == T
    assert used == pytest.approx([peak * f for f in SCHEDULES[ratio]], rel=1e-9, abs=0)
    assert used[0] > 0 and max(used) == pytest.approx(peak) and used[-1] == pytest.approx(peak / (T - math.ceil(
        ratio * T)))


# ---------------------------------------------------------------------------------------------------------------
# truncation and the glm2 multi-turn context
# ---------------------------------------------------------------------------------------------------------------
LONG_CONVERSATION = [
    {"role": "system", "content": "你是汽车故障诊断助手。"},
    {"role": "user", "content": "我的车空调不制冷，压缩机也不转，已经检查过保险丝和继电器都是好的。"},
    {"role": "assistant", "content": "那可能是压缩机离合器或者控制电路的问题，可以用万用表测量离合器线圈的供电。" * 2},
    {"role": "user", "content": "发动机水温高是什么原因？"},
    {"role": "assistant", "content": "冷却液不足或风扇不转。"},
]


@pytest.mark.parametrize("mode", ["glm", "glm2", "glm3"])
def test_truncation_keeps_the_final_question_and_its_answer(mode, tiny_dirs, tmp_path):
    import train
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"conversations": LONG_CONVERSATION}, ensure_ascii=False))
    tokenizer = MODE[mode].tokenizer.from_pretrained(tiny_dirs[mode])
    full = template.encode_messages(tokenizer, mode, LONG_CONVERSATION)[2]
    kept = LONG_CONVERSATION[:1] + LONG_CONVERSATION[3:4]  # system and the last question, the old round dropped
    fits = len(template.encode_context(tokenizer, mode, kept))
    assert fits < full
    args = train.parse_args(["--model_name_or_path", "-", "--mode", mode, "--train_path", str(path),
                             "--output_dir", "-", "--max_len", str(fits + 40), "--max_src_len", str(fits)])
    data, _ = train.build_data(args, tokenizer)
    example = data[0]
    assert data.stats.truncated == 1
    labelled = [t for t in example["labels"] if t != -100]
    answer_start = example["labels"].index(labelled[0])
    # the prompt is the one chat() builds for the system message and the final question, whole
    assert example["input_ids"][:answer_start] == template.encode_prompt(tokenizer, mode, LONG_CONVERSATION[3]["content"],
                                                                         history=[LONG_CONVERSATION[0]])
    assert LONG_CONVERSATION[4]["content"] in tokenizer.decode(labelled)

    # a question that alone is too long: its oldest characters go, the template (and [gMASK] sop) stays
    args.max_src_len = fits - 4
    example = train.build_data(args, tokenizer)[0][0]
    labelled = [t for t in example["labels"] if t != -100]
    prompt = example["input_ids"][:example["labels"].index(labelled[0])]
    assert len(prompt) <= fits - 4 and LONG_CONVERSATION[4]["content"] in tokenizer.decode(labelled)
    assert "原因？" in tokenizer.decode(prompt)
    if mode == "glm":
        assert prompt[-2:] == [template.special(tokenizer, "[gMASK]"), template.special(tokenizer, "sop")]
    else:
        assert prompt[:2] == [template.special(tokenizer, "[gMASK]"), template.special(tokenizer, "sop")]


@pytest.mark.parametrize("mode", ["glm", "glm2", "glm3"])
def test_max_src_len_must_leave_room_for_the_question(mode, tiny_dirs, tmp_path):
    import train
    tokenizer = MODE[mode].tokenizer.from_pretrained(tiny_dirs[mode])
    shortest = template.template_length(tokenizer, mode)
    argv = ["--model_name_or_path", "-", "--mode", mode, "--train_path", str(ROOT / "data/multiturn.jsonl"),
            "--output_dir", "-", "--max_len", str(shortest + 6), "--max_src_len", str(shortest)]
    with pytest.raises(SystemExit, match=f"--max_src_len {shortest} leaves no room"):
        train.build_data(train.parse_args(argv), tokenizer)
    argv[-1] = str(shortest + 1)  # the smallest accepted limit: every sample within --max_len, template intact
    data, _ = train.build_data(train.parse_args(argv), tokenizer)
    gmask_sop = [template.special(tokenizer, "[gMASK]"), template.special(tokenizer, "sop")]
    for example in data.examples:
        assert len(example["input_ids"]) <= shortest + 6
        ids = example["input_ids"]
        assert (gmask_sop in [ids[i:i + 2] for i in range(len(ids))]) if mode == "glm" else ids[:2] == gmask_sop


def test_glm2_training_context_is_what_predict_builds(tiny_dirs, tmp_path):
    """Every learned answer of a multi-turn glm2 sample follows exactly the ids predict.py builds for its history, and
    starts without sentencepiece's dummy-prefix token."""
    import predict
    import train
    tokenizer = MODE["glm2"].tokenizer.from_pretrained(tiny_dirs["glm2"])
    path = str(ROOT / "data/multiturn.jsonl")
    args = train.parse_args(["--model_name_or_path", "-", "--mode", "glm2", "--train_path", path, "--output_dir",
                             "-", "--max_len", "512", "--max_src_len", "400"])
    data, _ = train.build_data(args, tokenizer)
    for line, example in zip(Path(path).read_text().splitlines(), data.examples):
        sample = json.loads(line)
        rounds = sample["history"] + [[sample["instruction"] + sample["input"], sample["output"]]]
        ids, labels = example["input_ids"], example["labels"]
        starts = [i for i in range(len(labels)) if labels[i] != -100 and (i == 0 or labels[i - 1] == -100)]
        assert len(starts) == len(rounds)  # every answer learned (the default)
        # predict.py on the same conversation cut before each answer
        cut = Path(tmp_path, "rounds.jsonl")
        cut.write_text("".join(json.dumps({"history": rounds[:k], "instruction": q, "output": a},
                                          ensure_ascii=False) + "\n" for k, (q, a) in enumerate(rounds)))
        for start, test_sample, (_, answer) in zip(starts, predict.read_test_set(str(cut), "glm2"), rounds):
            built = template.encode_prompt(tokenizer, "glm2", test_sample["query"], test_sample["history"],
                                           test_sample["role"])  # as predict_file builds its prompts
            assert ids[:start] == built
            assert tokenizer.convert_ids_to_tokens(ids[start]) != "▁"
            assert tokenizer.decode(ids[start:start + len(tokenizer.encode_text(answer))]).startswith(answer[:4])


# ---------------------------------------------------------------------------------------------------------------
# flags
# ---------------------------------------------------------------------------------------------------------------
def test_boolean_flags_take_the_bare_form_and_true_false():
    import train
    base = ["--model_name_or_path", "-", "--mode", "glm3", "--train_path", "-", "--output_dir", "-"]
    for flag in ("--gradient_checkpointing", "--prefix_projection", "--is_skip", "--group_by_length",
                 "--last_turn_only", "--resume", "--compile", "--packing"):
        name = flag[2:]
        assert getattr(train.parse_args(base), name) is False
        assert getattr(train.parse_args([*base, flag]), name) is True
        assert getattr(train.parse_args([*base, flag, "True"]), name) is True
        assert getattr(train.parse_args([*base, flag, "false"]), name) is False
        assert getattr(train.parse_args([*base, flag, "--seed", "3"]), name) is True


@pytest.mark.parametrize("flag,value,message", [
    ("--show_loss_step", "0", "--show_loss_step must be at least 1"),
    ("--save_total_limit", "0", "--save_total_limit must be at least 1"),
    ("--warmup_ratio", "1.5", "--warmup_ratio must be between 0 and 1"),
    ("--gradient_checkpointing", "maybe", "expected True or False"),
])
def test_bad_flags_stop_with_one_line(flag, value, message, capsys):
    import train
    with pytest.raises(SystemExit) as error:
        train.parse_args(["--model_name_or_path", "-", "--mode", "glm3", "--train_path", "-", "--output_dir", "-",
                          flag, value])
    assert error.value.code == 2 and message in capsys.readouterr().err


def test_compile_with_zero3_stops_with_one_line(capsys):
    import train
    with pytest.raises(SystemExit) as error:
        train.parse_args(["--model_name_or_path", "-", "--mode", "glm3", "--train_path", "-", "--output_dir", "-",
                          "--compile", "--ds_file", str(ROOT / "ds_zero3_offload.json")])
    assert error.value.code == 2
    assert "--compile with ZeRO-3 (" in capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize("mode", ["glm", "glm2"])
def test_lora_on_the_lm_head_is_refused(mode, tiny_dirs, tmp_path):
    result = run_train(tiny_dirs[mode], tmp_path / "out", *common_args(mode, "lora", epochs=1), "--lora_module_name",
                       "query_key_value,output_layer" if mode == "glm2" else "lm_head", expect_ok=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "--lora_module_name: LoRA on the LM head" in result.stderr


def test_demo_picks_the_checkpoint_with_the_highest_step(tmp_path):
    work = tmp_path / "demo-glm3"
    for tag in ("epoch-1-step-9", "epoch-2-step-18", "epoch-9-step-162", "epoch-10-step-180", "epoch-3-step-27"):
        (work / "output" / tag / "deepspeed").mkdir(parents=True)
    line = next(line for line in (ROOT / "demo.sh").read_text().splitlines() if line.startswith("CHECKPOINT="))
    result = subprocess.run(["bash", "-c", f'set -euo pipefail; WORK="$1"; {line}; echo "$CHECKPOINT"', "-", work],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == f"{work}/output/epoch-10-step-180"


# ---------------------------------------------------------------------------------------------------------------
# fp16 P-Tuning
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("mode", ["glm", "glm2"])
def test_fp16_ptuning_stays_finite_at_large_prefix_values(mode, projection, tiny_dirs, one_thread):
    """The prefix encoder computes in fp32 and its keys/values enter attention in fp16: with prefix values in the
    thousands (a trained prefix stays far below), loss and gradients are finite and match fp32."""
    tokenizer = MODE[mode].tokenizer.from_pretrained(tiny_dirs[mode])
    ids, labels, _ = template.encode_messages(tokenizer, mode, [{"role": "user", "content": "发动机水温高"},
                                                                {"role": "assistant", "content": "风扇不转"}])
    batch = {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels])}
    results = {}
    for dtype in (torch.float32, torch.float16):
        model = MODE[mode].model.from_pretrained(tiny_dirs[mode], dtype=dtype, pre_seq_len=4,
                                                 prefix_projection=projection)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".prefix_encoder." in f".{name}":  # the output layer (or the plain embedding) scaled up
                    # values in the thousands either way (the projection sums ~30 tanh outputs); tens of thousands
                    # would overflow fp16 attention scores against the tiny model's queries, here and in THUDM's code
                    big = name.endswith("trans.2.weight") or (not projection and "embedding" in name)
                    scale = (100.0 if projection else 1000.0) if big else 1.0
                    param.copy_(torch.randn(param.shape, generator=generator) * scale)
        model.eval()  # no prefix dropout: the two dtypes see the same prefix
        loss = model(**batch).loss
        loss.backward()
        prefix = model.transformer.prefix_encoder(torch.arange(4)[None])
        grads = [p.grad for n, p in model.named_parameters() if p.grad is not None]
        results[dtype] = loss.item()
        assert prefix.abs().max().item() > 1000
        assert math.isfinite(loss.item()) and all(torch.isfinite(g).all() for g in grads), (dtype, loss)
    assert abs(results[torch.float16] - results[torch.float32]) < 2e-2 * results[torch.float32]
