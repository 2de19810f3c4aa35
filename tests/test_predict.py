"""predict.py and inference.load_for_inference on tiny checkpoints: batched left-padded generation, batch prediction with
metrics, an over-fit model scoring 1.0, the terminal chat through a pseudo-terminal, and bad input."""
import io
import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

import predict
from conftest import ROOT, overfit
from metrics import compute_metrics
from model import MODE, template
from test_merge_lora import make_lora_adapter
from dataset import sample_to_messages
from inference import CheckpointError, load_for_inference

MODES = ["glm", "glm2", "glm3", "glm4"]
INSTRUCTION = "抽取三元组："
FIT_SAMPLES = [
    {"instruction": INSTRUCTION, "input": "发动机水温高，风扇低速转动。", "output": "发动机_部件故障_水温高\n风扇_部件故障_低速转动"},
    {"instruction": INSTRUCTION, "input": "喷油嘴堵塞。", "output": "喷油嘴_部件故障_堵塞"},
    {"instruction": INSTRUCTION, "input": "冷却系统由散热器和水泵组成。", "output": "冷却系统_组成_散热器\n冷却系统_组成_水泵"},
]
QUERIES = [("你好", []), ("发动机水温高，风扇低速转动。请抽取三元组。", []), ("喷油嘴堵塞。", [("你好", "你好！")]),
           ("What should I check first?", [])]


pytestmark = pytest.mark.usefixtures("one_thread")


def write_jsonl(path, records) -> str:
    Path(path).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def training_args(directory, mode, train_type, base):
    Path(directory, "training_args.json").write_text(json.dumps(
        {"mode": mode, "train_type": train_type, "model_name_or_path": os.path.abspath(base)}))


# ------------------------------------------------------------------------------------------------------------------
# checkpoints of each kind
# ------------------------------------------------------------------------------------------------------------------
def make_ptuning_checkpoint(mode, base, output_dir, pre_seq_len=4, projection=True):
    """A P-Tuning checkpoint as train.py writes it (config.json + prefix_encoder.safetensors), with a random prefix
    large enough to change the answers. Returns (dir, the in-memory model)."""
    model = MODE[mode].model.from_pretrained(base, pre_seq_len=pre_seq_len, prefix_projection=projection).eval()
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".prefix_encoder." in f".{name}":
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    os.makedirs(output_dir)
    model.config.save_pretrained(output_dir)
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k.startswith("transformer.prefix_encoder.")},
              os.path.join(output_dir, "prefix_encoder.safetensors"))
    MODE[mode].tokenizer.from_pretrained(base).save_pretrained(output_dir)
    training_args(output_dir, mode, "ptuning", base)
    return str(output_dir), model


def overfit_on_samples(mode, base, output_dir, max_steps=400):
    """Plain AdamW on FIT_SAMPLES until the loss is tiny; saved as a full checkpoint."""
    overfit(mode, base, output_dir, [sample_to_messages(mode, s, "fit") for s in FIT_SAMPLES], max_steps,
            stop_below=0.01, must_reach=0.05)
    training_args(output_dir, mode, "all", base)
    return str(output_dir)


@pytest.fixture(scope="module")
def checkpoints(tiny_dirs, tmp_path_factory):
    """(mode, kind) -> checkpoint dir, built on first use: full (the tiny base), lora, ptuning, fit (over-fit)."""
    root = tmp_path_factory.mktemp("predict-checkpoints")
    built = {}

    def get(mode, kind):
        if (mode, kind) not in built:
            base, target = tiny_dirs[mode], root / f"{mode}-{kind}"
            if kind == "full":
                built[mode, kind] = base
            elif kind == "lora":
                built[mode, kind] = make_lora_adapter(mode, base, target)
            elif kind == "ptuning":
                built[mode, kind] = make_ptuning_checkpoint(mode, base, target)[0]
            else:
                built[mode, kind] = overfit_on_samples(mode, base, target)
        return built[mode, kind]

    return get


def greedy_args(**overrides):
    values = dict(max_new_tokens=10, do_sample=False, num_beams=1, top_p=0.8, temperature=0.8)
    values.update(overrides)
    return SimpleNamespace(**values)


# ------------------------------------------------------------------------------------------------------------------
# (a) batched, left-padded generation == one prompt at a time
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["full", "lora", "ptuning"])
@pytest.mark.parametrize("mode", MODES)
def test_batched_left_padded_generation_equals_one_by_one(mode, kind, checkpoints):
    model, tokenizer = load_for_inference(mode, checkpoints(mode, kind))
    prompts = [template.encode_prompt(tokenizer, mode, q, h) for q, h in QUERIES]
    lengths = sorted(len(p) for p in prompts)
    assert lengths[-2] < lengths[-1]  # every row but the longest is padded
    gen_kwargs = predict.generation_kwargs(greedy_args(), tokenizer, mode)
    gen_kwargs["eos_token_id"] = None  # random weights: run the full length, the harder case for padding
    batched = predict.generate_batch(model, tokenizer, mode, prompts, gen_kwargs)
    alone = [predict.generate_batch(model, tokenizer, mode, [p], gen_kwargs)[0] for p in prompts]
    assert batched == alone
    assert max(len(ids) for ids in batched) == 10  # (a row stops early only where it meets a stop token)
    if mode != "glm":  # (the tiny random ChatGLM-6B answers every prompt alike)
        assert len({tuple(ids) for ids in batched}) > 1


# ------------------------------------------------------------------------------------------------------------------
# load_for_inference
# ------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def prompt_logits(model, tokenizer, mode):
    ids = torch.tensor([template.encode_prompt(tokenizer, mode, "发动机水温高，风扇低速转动。")])
    return model(input_ids=ids).logits


@pytest.mark.parametrize("mode", MODES)
def test_load_for_inference_recognises_each_kind(mode, tiny_dirs, tmp_path):
    from peft import PeftModel

    base = tiny_dirs[mode]
    plain, tokenizer = load_for_inference(mode, base)
    assert not plain.training and plain.dtype == torch.float32 and plain.device.type == "cpu"
    base_logits = prompt_logits(plain, tokenizer, mode)

    adapter = make_lora_adapter(mode, base, tmp_path / "lora")
    lora, _ = load_for_inference(mode, adapter)
    assert isinstance(lora, PeftModel) and not lora.training
    reference = PeftModel.from_pretrained(MODE[mode].model.from_pretrained(base), adapter).eval()
    assert torch.equal(prompt_logits(lora, tokenizer, mode), prompt_logits(reference, tokenizer, mode))
    assert (prompt_logits(lora, tokenizer, mode) - base_logits).abs().max() > 1e-3

    prefix_dir, in_memory = make_ptuning_checkpoint(mode, base, tmp_path / "ptuning")
    ptuning, _ = load_for_inference(mode, prefix_dir)
    assert ptuning.config.pre_seq_len == 4 and ptuning.config.prefix_projection is True
    assert torch.equal(prompt_logits(ptuning, tokenizer, mode), prompt_logits(in_memory, tokenizer, mode))
    assert (prompt_logits(ptuning, tokenizer, mode) - base_logits).abs().max() > 1e-3

    half, _ = load_for_inference(mode, base, dtype="bf16")
    assert half.dtype == torch.bfloat16


def test_load_for_inference_errors(tiny_dirs, tmp_path):
    base3, base2 = tiny_dirs["glm3"], tiny_dirs["glm2"]
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_for_inference("glm3", str(tmp_path / "nowhere"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match="neither a full model .* nor a P-Tuning prefix"):
        load_for_inference("glm3", str(tmp_path / "junk"))
    with pytest.raises(CheckpointError, match="this is a glm2 checkpoint, but --mode is glm3"):
        load_for_inference("glm3", base2)

    # an adapter whose recorded base is gone: clear error, and --base_model_path fixes it
    adapter = Path(make_lora_adapter("glm3", base3, tmp_path / "lora"))
    training_args(adapter, "glm3", "lora", tmp_path / "moved-away")
    with pytest.raises(CheckpointError, match=r"moved-away \(from .*training_args.json\) does not exist; pass "
                                              r"--base_model_path"):
        load_for_inference("glm3", str(adapter))
    model, _ = load_for_inference("glm3", str(adapter), base_model_path=base3)
    assert not model.training
    # ... a base of another version
    with pytest.raises(CheckpointError, match="base model from --base_model_path is unusable: .*this is a glm2 "
                                              "checkpoint, but --mode is glm3"):
        load_for_inference("glm3", str(adapter), base_model_path=base2)
    # ... the adapter trained for another mode
    with pytest.raises(CheckpointError, match="trained with --mode glm3, but --mode is glm2"):
        load_for_inference("glm2", str(adapter), base_model_path=base2)

    # P-Tuning: saved settings that disagree with the saved prefix weights
    prefix_dir = Path(make_ptuning_checkpoint("glm3", base3, tmp_path / "ptuning")[0])
    config = json.loads((prefix_dir / "config.json").read_text())
    (prefix_dir / "config.json").write_text(json.dumps({**config, "pre_seq_len": 5}))
    with pytest.raises(CheckpointError, match=r"embedding.weight has shape \(4, \d+\), but config.json "
                                              r"\(pre_seq_len=5, prefix_projection=True\) needs \(5, \d+\)"):
        load_for_inference("glm3", str(prefix_dir))
    (prefix_dir / "config.json").write_text(json.dumps({**config, "prefix_projection": False}))
    with pytest.raises(CheckpointError, match=r"keys do not fit config.json \(pre_seq_len=4, "
                                              r"prefix_projection=False\)"):
        load_for_inference("glm3", str(prefix_dir))


def test_ptuning_checkpoint_loads_without_a_false_missing_weights_report(checkpoints, tiny_dirs, tmp_path, capfd,
                                                                          caplog):
    """A P-Tuning checkpoint's prefix is built on a base that has none and is then loaded from
    prefix_encoder.safetensors: transformers' load report (transformers/utils/loading_report.py, a logger warning)
    must not call it MISSING / newly initialized. A weight truly missing from a checkpoint is still reported.
    (The console: what is printed, and the log records, which pytest takes from the handlers that print them.)"""
    prefix_dir = checkpoints("glm3", "ptuning")
    capfd.readouterr()  # building the checkpoint loads the base with a prefix too
    caplog.clear()
    assert predict.main(["--mode", "glm3", "--model_path", prefix_dir, "--query", "你好", "--max_new_tokens", "2"]) == 0
    console = "".join(capfd.readouterr()) + caplog.text
    assert "MISSING" not in console and "newly initialized" not in console, console

    from safetensors.torch import load_file
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in os.listdir(tiny_dirs["glm3"]):
        if name != "model.safetensors":
            (broken / name).write_bytes(Path(tiny_dirs["glm3"], name).read_bytes())
    weights = load_file(os.path.join(tiny_dirs["glm3"], "model.safetensors"))
    dropped = next(key for key in weights if key.endswith("final_layernorm.weight"))
    save_file({k: v for k, v in weights.items() if k != dropped}, str(broken / "model.safetensors"))
    caplog.clear()
    assert predict.main(["--mode", "glm3", "--model_path", str(broken), "--query", "你好"]) == 2
    console = "".join(capfd.readouterr()) + caplog.text
    assert "MISSING" in console and f"missing weights ['{dropped}']" in console, console


# ------------------------------------------------------------------------------------------------------------------
# (b) batch prediction writes one line per sample and the metrics
# ------------------------------------------------------------------------------------------------------------------
def test_predict_file_writes_predictions_and_metrics(checkpoints, tmp_path):
    mode = "glm3"
    records = [
        {"instruction": INSTRUCTION, "input": "喷油嘴堵塞。", "output": "喷油嘴_部件故障_堵塞"},
        {"history": [["你好", "你好！"]], "instruction": "请回答：", "input": "风扇不转怎么办？", "output": "检查风扇。"},
        {"conversations": [{"role": "system", "content": "你是汽车故障诊断助手。"},
                           {"role": "user", "content": "发动机水温高怎么办？"},
                           {"role": "assistant", "content": "先停车降温。"}]},
    ]
    test_path = write_jsonl(tmp_path / "test.jsonl", records)
    out = tmp_path / "pred" / "out.jsonl"  # the directory is created
    command = [sys.executable, str(ROOT / "predict.py"), "--mode", mode, "--model_path", checkpoints(mode, "full"),
               "--test_path", test_path, "--output_path", str(out), "--batch_size", "2", "--max_new_tokens", "6",
               "--do_sample", "false"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [line["reference"] for line in lines] == ["喷油嘴_部件故障_堵塞", "检查风扇。", "先停车降温。"]
    assert [line["prompt"] for line in lines] == [INSTRUCTION + "喷油嘴堵塞。", "请回答：风扇不转怎么办？",
                                                  "发动机水温高怎么办？"]
    assert all(set(line) == {"prompt", "reference", "prediction"} for line in lines)
    metrics = json.loads((tmp_path / "pred" / "out.metrics.json").read_text())
    expected = compute_metrics([line["prediction"] for line in lines], [line["reference"] for line in lines])
    assert metrics == pytest.approx(expected)
    assert json.loads(result.stdout) == pytest.approx(expected)
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.jsonl", "out.metrics.json"]  # no temp files

    # each prediction is what chat() answers to the same conversation (same prompt, left padding changes nothing)
    model, tokenizer = load_for_inference(mode, checkpoints(mode, "full"))
    histories = [[], [("你好", "你好！")], [{"role": "system", "content": "你是汽车故障诊断助手。"}]]
    for line, history in zip(lines, histories):
        response, _ = model.chat(tokenizer, line["prompt"], history=history, do_sample=False, max_new_tokens=6)
        assert line["prediction"] == response


# ------------------------------------------------------------------------------------------------------------------
# (c) an over-fit model scores 1.0
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_overfit_model_scores_perfectly(mode, checkpoints, tmp_path, capsys):
    fitted = checkpoints(mode, "fit")
    test_path = tmp_path / "test.json"  # a JSON array this time
    test_path.write_text(json.dumps(FIT_SAMPLES, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    capsys.readouterr()  # what building the fitted checkpoint printed is not predict.py's output
    assert predict.main(["--mode", mode, "--model_path", fitted, "--test_path", str(test_path), "--output_path",
                         str(out), "--batch_size", "2", "--max_new_tokens", "40"]) == 0
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [line["prediction"] for line in lines] == [s["output"] for s in FIT_SAMPLES]
    metrics = json.loads((tmp_path / "out.metrics.json").read_text())
    assert metrics["samples"] == 3
    for key in ("exact_match", "triple_precision", "triple_recall", "triple_f1", "bleu4", "rouge1", "rouge2",
                "rougeL"):
        assert metrics[key] == 1.0, key
    assert json.loads(capsys.readouterr().out) == metrics


def test_query_prints_one_answer(checkpoints, capsys):
    fitted = checkpoints("glm3", "fit")
    capsys.readouterr()  # building the checkpoint imports DeepSpeed, whose accelerator warning goes to stdout
    sample = FIT_SAMPLES[2]
    assert predict.main(["--mode", "glm3", "--model_path", fitted, "--query", sample["instruction"] + sample["input"],
                         "--max_new_tokens", "40"]) == 0
    assert capsys.readouterr().out == sample["output"] + "\n"


# ------------------------------------------------------------------------------------------------------------------
# (d) the terminal chat, driven through a pseudo-terminal
# ------------------------------------------------------------------------------------------------------------------
class Terminal:
    """A child process on a pseudo-terminal; `expect` reads until a marker has appeared `count` times."""

    def __init__(self, command, cwd, env):
        master, slave = pty.openpty()
        self.proc = subprocess.Popen(command, cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=subprocess.PIPE,
                                     close_fds=True)
        os.close(slave)
        self.master, self.output = master, b""

    def expect(self, marker: str, count: int, timeout: float = 120):
        deadline = time.time() + timeout
        encoded = marker.encode()
        while self.output.count(encoded) < count:
            ready, _, _ = select.select([self.master], [], [], max(0.0, deadline - time.time()))
            chunk = b""
            if ready:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:  # EIO: the child has closed the terminal
                    pass
            if not chunk:
                self.proc.kill()
                raise AssertionError(f"no {marker!r} #{count} (exit {self.proc.poll()}): "
                                     f"{self.text()[-1500:]}\nstderr: {self.proc.stderr.read().decode()[-1500:]}")
            self.output += chunk

    def send(self, line: str):
        os.write(self.master, (line + "\n").encode())

    def text(self) -> str:
        return self.output.decode("utf-8", errors="replace").replace("\r\n", "\n")

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stderr.close()
        os.close(self.master)


def test_interactive_chat_through_a_pty(checkpoints):
    mode, fitted = "glm3", checkpoints("glm3", "fit")
    model, tokenizer = load_for_inference(mode, fitted)
    first = FIT_SAMPLES[0]["instruction"] + FIT_SAMPLES[0]["input"]
    answer1, history = model.chat(tokenizer, first, do_sample=False, max_new_tokens=40)
    assert answer1 == FIT_SAMPLES[0]["output"]
    with_history, _ = model.chat(tokenizer, "你好", history=history, do_sample=False, max_new_tokens=40)
    fresh, _ = model.chat(tokenizer, "你好", do_sample=False, max_new_tokens=40)
    assert with_history != fresh  # so the transcript shows whether the history was kept, then cleared

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8", "PYTHONUNBUFFERED": "1"}
    terminal = Terminal([sys.executable, str(ROOT / "predict.py"), "--mode", mode, "--model_path", fitted,
                         "--max_new_tokens", "40"], ROOT, env)
    try:
        terminal.expect("用户：", 1)
        terminal.send(first)
        terminal.expect("用户：", 2)
        terminal.send("你好")
        terminal.expect("用户：", 3)
        terminal.send("clear")
        terminal.expect("用户：", 4)
        terminal.send("你好")
        terminal.expect("用户：", 5)
        terminal.send("exit")
        assert terminal.proc.wait(timeout=60) == 0
        try:  # what is left on the terminal
            while select.select([terminal.master], [], [], 0.5)[0]:
                chunk = os.read(terminal.master, 4096)
                if not chunk:
                    break
                terminal.output += chunk
        except OSError:
            pass
    finally:
        terminal.close()
    turns = terminal.text().split("用户：")
    assert "clear" in turns[0] and "exit" in turns[0]  # the welcome line explains both commands
    assert turns[1] == f"{first}\n\nChatGLM：{answer1}\n\n"  # echo of the query, then the streamed answer
    assert turns[2] == f"你好\n\nChatGLM：{with_history}\n\n"  # answered with the first turn as history
    assert turns[3].startswith("clear\n") and "对话历史已清空" in turns[3] and "ChatGLM：" not in turns[3]
    assert turns[4] == f"你好\n\nChatGLM：{fresh}\n\n"  # the history was cleared
    assert turns[5].startswith("exit") and "ChatGLM：" not in turns[5]


# ------------------------------------------------------------------------------------------------------------------
# (e) bad input
# ------------------------------------------------------------------------------------------------------------------
def test_malformed_line_fails_before_generation(tiny_dirs, tmp_path):
    test_path = tmp_path / "test.jsonl"
    test_path.write_text(json.dumps(FIT_SAMPLES[0], ensure_ascii=False) + "\n{\"instruction\": \"x\", \n",
                         encoding="utf-8")
    out = tmp_path / "out.jsonl"
    result = subprocess.run([sys.executable, str(ROOT / "predict.py"), "--mode", "glm3", "--model_path",
                             tiny_dirs["glm3"], "--test_path", str(test_path), "--output_path", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert f"{test_path}:2: " in result.stderr and "column" in result.stderr
    assert "loaded" not in result.stderr  # failed before the model was loaded
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test.jsonl"]


def bad_predict(capsys, *args) -> str:
    assert predict.main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("predict.py")]
    assert len(lines) == 1 and lines[0].startswith("predict.py: error: "), err  # one line (besides library warnings)
    return lines[0]


def test_bad_samples_and_outputs(tiny_dirs, tmp_path, capsys):
    base = tiny_dirs["glm3"]
    out = tmp_path / "out.jsonl"
    common = ("--mode", "glm3", "--model_path", base, "--output_path", out, "--max_new_tokens", 2)
    no_output = write_jsonl(tmp_path / "a.jsonl", [FIT_SAMPLES[0], FIT_SAMPLES[1], {"instruction": "x"}])
    assert f"{no_output}:3: sample has no 'output'" in bad_predict(capsys, *common, "--test_path", no_output)
    unfinished = write_jsonl(tmp_path / "b.jsonl", [{"conversations": [{"role": "user", "content": "x"}]}])
    assert f"{unfinished}:1: the conversation must end with an assistant turn" in \
        bad_predict(capsys, *common, "--test_path", unfinished)
    array = tmp_path / "c.json"
    array.write_text('[{"instruction": "x", "output": "y"},\n {"output": }]')
    assert f"{array}:2: " in bad_predict(capsys, *common, "--test_path", array)
    assert not out.exists()

    good = write_jsonl(tmp_path / "good.jsonl", FIT_SAMPLES[:2])
    out.write_text("keep me")
    assert "exists; pass --overwrite" in bad_predict(capsys, *common, "--test_path", good)
    assert out.read_text() == "keep me"
    assert predict.main([str(a) for a in (*common, "--test_path", good, "--overwrite")]) == 0
    assert len(out.read_text().splitlines()) == 2
    capsys.readouterr()
    assert "no such checkpoint directory" in bad_predict(capsys, "--mode", "glm3", "--model_path",
                                                         tmp_path / "nowhere", "--query", "x")


def test_failure_midway_leaves_nothing(tiny_dirs, tmp_path, monkeypatch):
    test_path = write_jsonl(tmp_path / "test.jsonl", FIT_SAMPLES)
    real = predict.generate_batch
    calls = []

    def fail_on_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(predict, "generate_batch", fail_on_second_batch)
    with pytest.raises(RuntimeError, match="simulated"):
        predict.main(["--mode", "glm3", "--model_path", tiny_dirs["glm3"], "--test_path", test_path,
                      "--output_path", str(tmp_path / "out.jsonl"), "--batch_size", "2", "--max_new_tokens", "2"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test.jsonl"]


def test_flags():
    base = ["--mode", "glm3", "--model_path", "x"]
    for text, value in (("True", True), ("true", True), ("1", True), ("False", False), ("false", False),
                        ("0", False)):
        assert predict.parse_args([*base, "--do_sample", text]).do_sample is value
    assert predict.parse_args(base).do_sample is False
    assert predict.parse_args([*base, "--do_sample"]).do_sample is True  # the bare form too
    assert predict.parse_args([*base, "--overwrite"]).overwrite is True
    assert predict.parse_args([*base, "--overwrite", "False"]).overwrite is False
    for bad in (["--do_sample", "maybe"], ["--query", "q", "--test_path", "t", "--output_path", "o"],
                ["--test_path", "t"], ["--output_path", "o"], ["--batch_size", "0"],
                ["--do_sample", "True", "--top_p", "1.5"]):
        with pytest.raises(SystemExit) as error:
            predict.parse_args([*base, *bad])
        assert error.value.code == 2


def test_interactive_chat_with_beam_search_prints_the_whole_answer(tiny_dirs, monkeypatch, capsys):
    """Beam search cannot stream: the terminal chat answers with chat() and prints the answer whole."""
    model, tokenizer = load_for_inference("glm3", tiny_dirs["glm3"])
    first, history = model.chat(tokenizer, "你好", do_sample=False, num_beams=2, max_new_tokens=8)
    second, _ = model.chat(tokenizer, "发动机水温高", history=history, do_sample=False, num_beams=2, max_new_tokens=8)
    monkeypatch.setattr(sys, "stdin", io.StringIO("你好\n发动机水温高\nexit\n"))
    assert predict.main(["--mode", "glm3", "--model_path", tiny_dirs["glm3"], "--num_beams", "2",
                         "--max_new_tokens", "8"]) == 0
    turns = capsys.readouterr().out.split("用户：")
    assert f"ChatGLM：{first}\n" in turns[1]
    assert f"ChatGLM：{second}\n" in turns[2]  # with the first turn as history


@pytest.mark.parametrize("mode,record,shown", [
    ("glm", {"instruction": "抽取：", "input": "发动机", "output": "故障:发动机,风扇"}, "故障：发动机，风扇"),
    ("glm3", {"conversations": [{"role": "user", "content": "北京天气"},
                                {"role": "assistant", "metadata": "get_weather", "content": '{"city": "北京"}'}]},
     None),
])
def test_a_prediction_identical_to_its_reference_scores_perfectly(mode, record, shown, tiny_dirs, tmp_path,
                                                                  monkeypatch):
    """The model generates exactly the tokens training teaches for the reference; predict.py post-processes them as
    chat() does (glm: full-width punctuation; glm3: a tool call as {"name", "content"}), and the reference alike."""
    tokenizer = MODE[mode].tokenizer.from_pretrained(tiny_dirs[mode])
    ids, _, start = template.encode_messages(tokenizer, mode, sample_to_messages(mode, record, "t"), False)
    monkeypatch.setattr(predict, "generate_batch", lambda model, tok, m, prompts, kwargs: [ids[start:]] * len(prompts))
    test_path, out = write_jsonl(tmp_path / "test.jsonl", [record]), tmp_path / "out.jsonl"
    assert predict.main(["--mode", mode, "--model_path", tiny_dirs[mode], "--test_path", test_path,
                         "--output_path", str(out)]) == 0
    line = json.loads(out.read_text(encoding="utf-8"))
    if shown:
        assert line["prediction"] == shown
    else:
        assert json.loads(line["prediction"])["name"] == "get_weather"
    assert line["reference"] == line["prediction"]
    metrics = json.loads((tmp_path / "out.metrics.json").read_text())
    assert metrics["exact_match"] == 1.0 and metrics["triple_f1"] == 1.0 and metrics["rougeL"] == 1.0
