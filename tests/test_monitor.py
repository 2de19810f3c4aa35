"""What training shows (monitor.py), through train.main on the tiny checkpoints: the --preview of a known sample, the
data set's shape line, the warnings before a run goes wrong (each from a crafted input, none on the sample data),
sample answers at every evaluation (samples.jsonl), the loss plot read back from loss.png; and a quiet predict.py."""
import json
import logging
import os
import re
import subprocess
import sys
from itertools import count
from types import SimpleNamespace

import numpy as np
import pytest

import monitor
import train
from conftest import ROOT, one_rank_env, shared_path
from dataset import InstructionDataset
from model import MODE, template
from test_merge_lora import make_lora_adapter

TRAIN = ROOT / "data" / "train.jsonl"
FIRST = json.loads(TRAIN.read_text(encoding="utf-8").splitlines()[0])  # the known sample of the preview tests


def flags(mode, base, out, *extra):
    return [str(a) for a in ("--mode", mode, "--model_name_or_path", base, "--train_path", TRAIN,
                             "--output_dir", out, *extra)]


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "chatglm" and r.levelno == logging.WARNING]


@pytest.fixture
def no_engine(monkeypatch):
    """--preview_only must get by without DeepSpeed and without model weights."""
    import deepspeed

    def refuse(*args, **kwargs):
        raise AssertionError("--preview_only started DeepSpeed or loaded weights")
    monkeypatch.setattr(deepspeed, "initialize", refuse)
    monkeypatch.setattr(train, "init_distributed", refuse)
    monkeypatch.setattr(train, "build_model", refuse)


# ------------------------------------------------------------------------------------------------------------------
# --preview and the data set's shape
# ------------------------------------------------------------------------------------------------------------------
def test_preview_only_shows_the_known_sample_with_its_learned_span(tiny_dirs, tmp_path, capsys, caplog, no_engine):
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="chatglm"):
        train.main(flags("glm3", tiny_dirs["glm3"], out, "--preview_only", "--preview", "1"))
    printed = capsys.readouterr().out
    assert not out.exists()  # nothing written
    tokenizer = MODE["glm3"].tokenizer.from_pretrained(tiny_dirs["glm3"])
    messages = [{"role": "user", "content": FIRST["instruction"] + FIRST["input"]},
                {"role": "assistant", "content": FIRST["output"]}]
    ids, labels, start = template.encode_messages(tokenizer, "glm3", messages)
    learned = sum(label != -100 for label in labels)
    assert (f"--- sample 1 ({TRAIN}:1): {len(ids)} tokens, {len(ids) - learned} prompt, {learned} learned; "
            f"stop token learned: yes (</s>); truncation: none") in printed
    body = printed.split("truncation: none\n", 1)[1]
    prompt, span = re.fullmatch(r"(.*)\[\[(.*)\]\]\n", body, re.S).groups()  # exactly one learned span, at the end
    assert prompt.startswith("[gMASK]sop<|user|>") and prompt.endswith("<|assistant|>")
    assert FIRST["instruction"] + FIRST["input"] in prompt
    # the answer and its end token are learned (the tiny sentencepiece decodes a space after a newline)
    assert "".join(span.split()) == "".join(FIRST["output"].split()) + "</s>"
    assert "2 samples" not in printed and "--- sample 2" not in printed
    # the shape line, counted here from the data set train.py builds
    data = InstructionDataset(str(TRAIN), tokenizer, "glm3", 1024, 256)
    tokens = sum(sum(label != -100 for label in e["labels"][1:]) for e in data.examples)
    longest = max(len(e["input_ids"]) for e in data.examples)
    assert f"{TRAIN}: 24 samples, {tokens} labelled tokens, 0 truncated, 0 skipped, longest {longest} tokens" in \
        caplog.messages


@pytest.mark.parametrize("extra", [(), ("--packing",)], ids=["padded", "packed"])
def test_preview_and_shape_describe_the_samples_also_when_packed(tiny_dirs, tmp_path, capsys, caplog, no_engine,
                                                                 extra):
    """--packing puts samples into rows; the preview and the shape line still show the samples themselves."""
    with caplog.at_level(logging.INFO, logger="chatglm"):
        train.main(flags("glm3", tiny_dirs["glm3"], tmp_path / "out", "--preview_only", "--preview", "1", *extra))
    assert f"--- sample 1 ({TRAIN}:1): " in capsys.readouterr().out
    assert any(message.startswith(f"{TRAIN}: 24 samples, ") for message in caplog.messages)


def test_preview_says_what_truncation_did(tiny_dirs, tmp_path, capsys, no_engine):
    train.main(flags("glm3", tiny_dirs["glm3"], tmp_path / "out", "--preview_only", "--preview", "1",
                     "--max_len", "40", "--max_src_len", "30"))
    printed = capsys.readouterr().out
    tokenizer = MODE["glm3"].tokenizer.from_pretrained(tiny_dirs["glm3"])
    full, _, _ = template.encode_messages(tokenizer, "glm3", [
        {"role": "user", "content": FIRST["instruction"] + FIRST["input"]},
        {"role": "assistant", "content": FIRST["output"]}])
    assert f"40 tokens" in printed
    assert f"truncation: cut from {len(full)} to 40 tokens (--max_len 40, --max_src_len 30)" in printed
    assert "stop token learned: yes (</s>)" in printed  # the cut answer keeps its end token
    assert printed.rstrip().endswith("</s>]]")
    # --is_skip: the sample is not seen at all
    train.main(flags("glm3", tiny_dirs["glm3"], tmp_path / "out", "--preview_only", "--preview", "1",
                     "--max_len", "60", "--max_src_len", "50", "--is_skip"))
    assert f"({TRAIN}:1): skipped (--is_skip): {len(full)} tokens" in capsys.readouterr().out


@pytest.mark.parametrize("extra", [(), ("--packing",)], ids=["padded", "packed"])
def test_preview_of_a_tool_sample_that_cannot_fit_names_the_data_file_and_why(tiny_dirs, tmp_path, capsys, caplog,
                                                                             no_engine, extra):
    """A tool sample whose system text and tools alone are longer than --max_src_len is dropped by every run. The
    preview said "skipped (--is_skip)" (no --is_skip given), a warning named the temporary file the preview wrote it
    to, and the shape line said "0 skipped" right after the data set's "1 skipped as too long". Now the preview says
    why, every warning names --train_path and its line, and the shape line counts the sample as skipped."""
    tokenizer = MODE["glm4"].tokenizer.from_pretrained(tiny_dirs["glm4"])
    tool_sample = json.loads((ROOT / "data" / "tools_train.jsonl").read_text(encoding="utf-8").splitlines()[0])
    messages = [m for m in tool_sample["conversations"] if m["role"] == "system"] + [{"role": "user", "content": "x"}]
    system_only = len(template.encode_context(tokenizer, "glm4", messages))
    data = tmp_path / "tools.jsonl"
    data.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in (tool_sample, FIRST)), encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="chatglm"):
        train.main([str(a) for a in ("--mode", "glm4", "--model_name_or_path", tiny_dirs["glm4"], "--train_path", data,
                                     "--output_dir", tmp_path / "out", "--max_len", system_only + 100, "--max_src_len",
                                     system_only - 20, "--preview_only", "--preview", 4, *extra)])
    printed = capsys.readouterr().out
    assert f"--- sample 1 ({data}:1): skipped: cannot fit even after truncation" in printed
    assert "--is_skip" not in printed and f"--- sample 2 ({data}:2): " in printed
    warnings = warnings_of(caplog)
    assert warnings and all(w.startswith(f"{data}: ") and f"{data}:1" in w for w in warnings), warnings
    assert any(re.fullmatch(rf"{re.escape(str(data))}: 2 samples, \d+ labelled tokens, 0 truncated, 1 skipped "
                            rf"\(1 too long even after truncation\), longest \d+ tokens", m) for m in caplog.messages)


def test_preview_colours_the_learned_span_on_a_terminal(tiny_dirs):
    tokenizer = MODE["glm2"].tokenizer.from_pretrained(tiny_dirs["glm2"])
    ids, labels, start = template.encode_messages(tokenizer, "glm2", [{"role": "user", "content": "你好"},
                                                                        {"role": "assistant", "content": "好"}])
    stops = set(template.stop_token_ids(tokenizer, "glm2"))
    coloured = monitor.render(tokenizer, ids, labels, stops, colour=True)
    assert coloured.endswith("\033[0m") and "\033[1;32m" in coloured and "[[" not in coloured
    assert coloured.split("\033[1;32m")[0] == tokenizer.decode(ids[:start])


# ------------------------------------------------------------------------------------------------------------------
# warnings before a run goes wrong
# ------------------------------------------------------------------------------------------------------------------
def test_no_warning_on_the_sample_data(tiny_dirs, tmp_path, caplog, no_engine):
    for mode in ("glm", "glm3", "glm4"):
        with caplog.at_level(logging.INFO, logger="chatglm"):
            train.main(flags(mode, tiny_dirs[mode], tmp_path / "out", "--preview_only", "--train_type", "lora",
                             "--max_len", "256", "--max_src_len", "200"))
        assert warnings_of(caplog) == [], mode
        assert any("24 samples" in m for m in caplog.messages)  # the check ran
        caplog.clear()


def test_no_warning_on_the_shared_user_data(tiny_dirs, tmp_path, caplog, no_engine):
    path = shared_path("data", "spo_train.jsonl")
    # the README's command for this data (the tiny tokenizer cuts text into more tokens than the real one)
    with caplog.at_level(logging.INFO, logger="chatglm"):
        train.main(["--mode", "glm3", "--model_name_or_path", tiny_dirs["glm3"], "--train_path", str(path),
                    "--output_dir", str(tmp_path / "out"), "--preview_only", "--max_len", "1560",
                    "--max_src_len", "1024"])
    assert warnings_of(caplog) == []
    assert any(m.startswith(f"{path}: ") and "labelled tokens" in m for m in caplog.messages)


def test_most_samples_truncated_warns(tiny_dirs, tmp_path, caplog, no_engine):
    train.main(flags("glm3", tiny_dirs["glm3"], tmp_path / "out", "--preview_only", "--max_len", "40",
                     "--max_src_len", "30"))
    assert warnings_of(caplog) == [f"{TRAIN}: most samples are truncated (24 of 24) at --max_len 40 / --max_src_len "
                                   f"30: raise them, or see --preview what is left"]


def test_a_format_mistake_that_masks_labels_warns(tiny_dirs, tmp_path, caplog, monkeypatch, no_engine):
    """A template that forgets the end token's label, and one that masks a whole sample (the third)."""
    real = template.encode_messages
    calls = count(1)

    def encode(tokenizer, mode, messages, *args, **kwargs):
        ids, labels, start = real(tokenizer, mode, messages, *args, **kwargs)
        labels = labels[:-1] + [-100]  # the end token is not learned
        if next(calls) == 3:
            labels = [-100] * len(labels)
        return ids, labels, start
    monkeypatch.setattr(template, "encode_messages", encode)
    train.main(flags("glm2", tiny_dirs["glm2"], tmp_path / "out", "--preview_only"))
    assert warnings_of(caplog) == [
        f"{TRAIN}: 24 of 24 samples never learn the stop token (first: sample 1 as read): the model will not learn "
        f"where an answer ends",
        f"{TRAIN}: 1 of 24 samples have every label masked (first: sample 3 as read): they teach nothing"]


def crafted_args(tiny_dirs, **changes):
    args = train.parse_args(flags("glm3", tiny_dirs["glm3"], "-", "--max_len", "256", "--max_src_len", "200"))
    for name, value in changes.items():
        setattr(args, name, value)
    return args


@pytest.fixture(scope="module")
def sample_set(tiny_dirs):
    tokenizer = MODE["glm3"].tokenizer.from_pretrained(tiny_dirs["glm3"])
    return InstructionDataset(str(TRAIN), tokenizer, "glm3", 256, 200), tokenizer


@pytest.mark.parametrize("mode, train_type, reason", [
    ("glm3", "ptuning", "P-Tuning v2 in fp16 is reported to overflow"),
    ("glm2", "all", "full fine-tuning in fp16 is reported to reach a NaN loss"),
    ("glm4", "lora", "GLM-4-9B was trained in bf16 and overflows in fp16")])
def test_fp16_where_it_overflows_warns(mode, train_type, reason, tiny_dirs, sample_set):
    """fp16 needs a GPU (refused on the CPU in parse_args): the resolved precision is crafted."""
    dataset, tokenizer = sample_set
    args = crafted_args(tiny_dirs, precision="fp16", mode=mode, train_type=train_type)
    found = monitor.run_warnings(args, dataset, tokenizer, parameters=0)
    assert len(found) == 1 and found[0].startswith(f"--precision fp16 with --mode {mode} --train_type {train_type}: "
                                                   f"{reason}")
    args.precision = "bf16"
    assert monitor.run_warnings(args, dataset, tokenizer, parameters=0) == []
    args.precision, args.train_type, args.mode = "fp16", "lora", "glm3"  # fp16 LoRA on ChatGLM3 is fine
    assert monitor.run_warnings(args, dataset, tokenizer, parameters=0) == []


def test_learning_rate_far_above_the_usual_warns(tiny_dirs, sample_set):
    dataset, tokenizer = sample_set
    six_b = 12 * 28 * 4096 ** 2
    for train_type, usual, far in (("lora", 5e-4, 1e-2), ("all", 5e-5, 1e-3), ("ptuning", 2e-2, 0.5)):
        args = crafted_args(tiny_dirs, train_type=train_type, learning_rate=far)
        found = monitor.run_warnings(args, dataset, tokenizer, parameters=six_b)
        assert len(found) == 1 and found[0].startswith(f"--learning_rate {far:g} is over 10x what --train_type "
                                                       f"{train_type} usually takes"), found
        args.learning_rate = usual
        assert monitor.run_warnings(args, dataset, tokenizer, parameters=six_b) == []
    # the tiny checkpoint itself (rates far above the big models' are what it needs): silent
    args = crafted_args(tiny_dirs, learning_rate=1e-2)
    assert monitor.estimated_parameters(args.model_name_or_path) < monitor.BIG_MODEL
    assert monitor.run_warnings(args, dataset, tokenizer) == []


# ------------------------------------------------------------------------------------------------------------------
# sample answers and the loss plot, from a real run
# ------------------------------------------------------------------------------------------------------------------
PROMPTS = [{"instruction": "抽取三元组：", "input": "发动机水温高"},
           {"conversations": [{"role": "system", "content": "你是汽车故障诊断助手。"},
                              {"role": "user", "content": "风扇不转怎么办？"}]},
           "你好"]


@pytest.fixture(scope="module")
def watched_run(tiny_dirs, tmp_path_factory, one_thread):
    """One glm3 LoRA run: 24 samples in windows of 4 x 2, two epochs = 6 steps, a loss line every step, eval every
    2 steps and at each epoch end (steps 2, 3, 4, 6), three sample prompts answered within 5 new tokens."""
    monkeypatch = pytest.MonkeyPatch()
    one_rank_env(monkeypatch)
    tmp = tmp_path_factory.mktemp("watched")
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(p, ensure_ascii=False) for p in PROMPTS) + "\n", encoding="utf-8")
    out = tmp / "out"
    train.main(flags("glm3", tiny_dirs["glm3"], out, "--train_type", "lora", "--dev_path", ROOT / "data/dev.jsonl",
                     "--max_len", 256, "--max_src_len", 200, "--per_device_train_batch_size", 4,
                     "--gradient_accumulation_steps", 2, "--learning_rate", 2e-2, "--num_train_epochs", 2,
                     "--show_loss_step", 1, "--eval_step", 2, "--lora_module_name", "query_key_value,dense",
                     "--sample_prompts", prompts, "--max_new_tokens", 5))
    monkeypatch.undo()
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return out, log


def test_samples_jsonl_has_one_line_per_prompt_per_evaluation(watched_run):
    out, log = watched_run
    eval_steps = [r["step"] for r in log if "eval_loss" in r]
    assert eval_steps == [2, 3, 4, 6]
    lines = [json.loads(line) for line in (out / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(line["step"], line["prompt"]) for line in lines] == [
        (step, prompt) for step in eval_steps for prompt in ("抽取三元组：发动机水温高", "风扇不转怎么办？", "你好")]
    for line in lines:
        assert set(line) == {"step", "prompt", "answer", "flags", "tokens"} and 1 <= line["tokens"] <= 5
        assert isinstance(line["answer"], str) and set(line["flags"]) <= {"no_stop", "repeats"}
        if "no_stop" in line["flags"]:  # ran out of --max_new_tokens
            assert line["tokens"] == 5
    # TensorBoard has the answers as text
    events = b"".join(p.read_bytes() for p in (out / "runs").iterdir())
    assert b"samples/1" in events and b"samples/3" in events


def test_loss_png_is_a_png_of_every_logged_point(watched_run):
    from PIL import Image

    out, log = watched_run
    image = Image.open(out / "loss.png")
    image.load()
    assert image.format == "PNG" and image.size == (800, 450)
    assert len(np.unique(np.asarray(image.convert("L")))) > 20  # drawn, not blank
    points = json.loads(image.text["points"])
    steps = [r["step"] for r in log if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert points == {"training loss": 6, "smoothed (0.6)": 6, "eval loss": 4, "learning rate": 6}
    assert not (out / "loss.png.partial").exists()


def test_without_a_dev_set_the_end_answers_and_plots(tiny_dirs, tmp_path, monkeypatch, one_thread, capsys):
    """No evaluations: the answers and the plot come once, at the end. The --preview of a training run comes
    before it."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('"你好"\n', encoding="utf-8")
    out = tmp_path / "out"
    one_rank_env(monkeypatch)
    train.main(flags("glm2", tiny_dirs["glm2"], out, "--max_len", 256, "--max_src_len", 200, "--max_steps", 2,
                     "--per_device_train_batch_size", 2, "--show_loss_step", 1, "--learning_rate", 1e-2,
                     "--sample_prompts", prompts, "--max_new_tokens", 2, "--preview", 2))
    printed = capsys.readouterr().out
    assert f"--- sample 2 ({TRAIN}:2): " in printed and "--- sample 3" not in printed
    lines = [json.loads(line) for line in (out / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(line["step"], line["prompt"]) for line in lines] == [(2, "你好")]
    from PIL import Image
    points = json.loads(Image.open(out / "loss.png").text["points"])
    assert points == {"training loss": 2, "smoothed (0.6)": 2, "eval loss": 0, "learning rate": 2}


def test_plot_draws_the_log_it_reads(tmp_path):
    """The series drawn: a resumed run's repeated step counts once (the later record), evals on their own steps;
    the smoothing is TensorBoard's debiased moving average."""
    records = [{"step": 1, "loss": 4.0, "lr": 1e-3}, {"step": 2, "loss": 3.0, "lr": 1e-3},
               {"step": 2, "eval_loss": 3.5}, {"step": 2, "loss": 2.0, "lr": 5e-4}, {"step": 3, "loss": 1.0, "lr": 0}]
    (tmp_path / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    train_points, evals = monitor.read_log(str(tmp_path / "train_log.jsonl"))
    assert train_points == {1: (4.0, 1e-3), 2: (2.0, 5e-4), 3: (1.0, 0)} and evals == {2: 3.5}
    assert monitor.smooth([4.0, 2.0]) == pytest.approx([4.0, (0.6 * 0.4 * 4 + 0.4 * 2) / (1 - 0.36)])
    from PIL import Image
    points = json.loads(Image.open(monitor.plot_loss(str(tmp_path))).text["points"])
    assert points == {"training loss": 3, "smoothed (0.6)": 3, "eval loss": 1, "learning rate": 3}


def test_answer_flags_find_loops_and_missing_stops():
    stops = {2}
    assert monitor.answer_flags([5, 6, 7, 2], stops, 8) == []
    assert monitor.answer_flags([5, 6, 7, 8], stops, 4) == ["no_stop"]  # ran out of tokens
    assert monitor.answer_flags([9, 5, 6, 7, 5, 6, 7, 5, 6, 7, 5, 6, 7, 2], stops, 64) == ["repeats"]
    assert monitor.loop_length([9, 5, 6, 7, 5, 6, 7, 5, 6, 7, 5, 6, 7]) == 3
    assert monitor.loop_length([4] * 12) == 1 and monitor.loop_length([4] * 11) == 0  # "哈哈哈" is no loop
    # an extraction answer repeats its relation names, which is no loop
    assert monitor.loop_length([10, 11, 30, 11, 12, 40, 13, 11, 30, 11, 14, 41, 15, 11, 30, 11, 16]) == 0


def test_repeating_and_endless_answers_warn(tiny_dirs, tmp_path, caplog, monkeypatch):
    """The warnings of an evaluation, from answers crafted as generation's output."""
    tokenizer = MODE["glm3"].tokenizer.from_pretrained(tiny_dirs["glm3"])
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('"你好"\n"发动机"\n', encoding="utf-8")
    args = SimpleNamespace(mode="glm3", sample_prompts=str(prompts), ds_file=train.find_ds_file(
        None, "ds_zero2_no_offload.json"), train_path=str(TRAIN), preview=0, output_dir=str(tmp_path),
        max_new_tokens=8, precision="fp32", train_type="lora", learning_rate=1e-4,
        model_name_or_path=tiny_dirs["glm3"], max_len=256, max_src_len=200, is_skip=False)
    data = InstructionDataset(str(TRAIN), tokenizer, "glm3", 256, 200)
    watch = monitor.Monitor(args, tokenizer, data, rank=0, world_size=1)
    loop = tokenizer.encode("好的呀", add_special_tokens=False)
    answers = [loop * 6 + [tokenizer.eos_token_id], tokenizer.encode("发动机过热", add_special_tokens=False)[:8]]
    answers[1] += [answers[1][-1]] * (8 - len(answers[1]))
    import torch
    # a model without layers: the sample answers bypass sequence parallelism's attention (nothing to bypass here)
    engine = SimpleNamespace(eval=lambda: None, train=lambda: None, module=torch.nn.Module(), device="cpu")
    monkeypatch.setattr(monitor, "generate_answers", lambda *a, **k: answers)
    watch.at_evaluation(engine, 7, writer=None)
    lines = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [line["flags"] for line in lines] == [["repeats"], ["no_stop"]]
    assert warnings_of(caplog) == [
        f"step 7 | 1 of 2 sample answers repeat themselves (an n-gram loop): {prompts} line 1 ({len(loop)}-token loop)",
        f"step 7 | 1 of 2 sample answers did not reach the stop token within --max_new_tokens 8: {prompts} line 2"]


def test_bad_sample_prompts_stop_before_the_model_loads(tiny_dirs, tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('"你好"\n{"conversations": [{"role": "robot", "content": "a"}]}\n', encoding="utf-8")
    one_rank_env(monkeypatch)
    monkeypatch.setattr(train, "build_model", lambda *a: pytest.fail("the model loaded"))
    with pytest.raises(SystemExit, match=re.escape(f"{prompts}:2: unknown role 'robot'")):
        train.main(flags("glm3", tiny_dirs["glm3"], tmp_path / "out", "--sample_prompts", prompts))
    with pytest.raises(SystemExit):
        train.main(flags("glm3", tiny_dirs["glm3"], tmp_path / "out", "--sample_prompts", tmp_path / "missing"))


# ------------------------------------------------------------------------------------------------------------------
# a quiet console
# ------------------------------------------------------------------------------------------------------------------
def test_predict_prints_no_library_noise(tiny_dirs, tmp_path):
    """A LoRA checkpoint loads peft, which imports bitsandbytes (its CPU kernel notice) and reads a deprecated
    transformers property (a FutureWarning): neither reaches the user's console; our own log line does."""
    adapter = make_lora_adapter("glm3", tiny_dirs["glm3"], tmp_path / "adapter")
    result = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "predict.py"), "--mode", "glm3",
                             "--model_path", adapter, "--query", "你好", "--max_new_tokens", "3", "--device", "cpu"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    imported = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    # no QLoRA: bitsandbytes is not even imported (importtime lists the refused attempt, none of its modules)
    assert "peft" in imported and not any(name.startswith("bitsandbytes.") for name in imported)
    console = "\n".join(line for line in result.stderr.splitlines() if not line.startswith("import time:"))
    assert "(lora, base" in console  # our line stays
    for noise in ("gemm_4bit_forward", "kernels-community", "FutureWarning", "is_gradient_checkpointing"):
        assert noise not in console, console


@pytest.mark.parametrize("bits, imported", [(None, False), (0, False), (4, True)])
def test_bitsandbytes_is_imported_only_when_quantizing(bits, imported):
    """What the scripts call first thing with their parsed --quantization_bit: peft imports bitsandbytes only where
    the process quantizes (a QLoRA adapter's recorded bits count too: tests/test_user_path.py)."""
    code = (f"import sys, utils; utils.keep_bitsandbytes_out({bits}); import peft; "
            "print(sys.modules.get('bitsandbytes') is not None)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == str(imported)


def test_zero3_on_two_ranks_answers_with_the_trained_weights(tiny_dirs, tmp_path):
    """Under ZeRO-3 each rank holds a shard of every weight: all ranks generate in step (synced), rank 0 writes. The
    answers are those of the saved checkpoint loaded whole in one process; library deprecations DeepSpeed triggers
    stay out of the console."""
    from test_train import run_train

    from inference import load_for_inference
    from predict import decode_answer

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(p, ensure_ascii=False) for p in PROMPTS[:2]) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    result = run_train(tiny_dirs["glm3"], out, "--mode", "glm3", "--train_type", "lora", "--train_path", TRAIN,
                       "--dev_path", ROOT / "data/dev.jsonl", "--max_len", 256, "--max_src_len", 200,
                       "--per_device_train_batch_size", 2, "--gradient_accumulation_steps", 2, "--learning_rate",
                       2e-2, "--num_train_epochs", 1, "--lora_module_name", "query_key_value,dense",
                       "--ds_file", ROOT / "ds_zero3_offload.json", "--sample_prompts", prompts,
                       "--max_new_tokens", 4, ranks=2)
    lines = [json.loads(line) for line in (out / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(line["step"], line["prompt"]) for line in lines] == [(3, "抽取三元组：发动机水温高"), (3, "风扇不转怎么办？")]
    model, tokenizer = load_for_inference("glm3", str(out / "epoch-1-step-3"))
    asked = monitor.read_sample_prompts(str(prompts), "glm3")
    import torch
    with torch.no_grad():
        answers = monitor.generate_answers(model, tokenizer, "glm3", asked, 4, "cpu", synced=False)
    assert [line["answer"] for line in lines] == [decode_answer(tokenizer, "glm3", ids, p["messages"][:-1])
                                                  for ids, p in zip(answers, asked)]
    assert "FutureWarning" not in result.stderr, result.stderr[-2000:]
