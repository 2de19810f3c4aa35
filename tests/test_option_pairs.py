"""The run-shaping options in pairs (issue 34): every value of one option meets every value of every other in at least
one short run (a pairwise, "all-pairs", test set), or the pair is refused at start in one line naming both options.

Two features each tested alone broke where they met (sample answers under sequence parallelism hung on the
all-to-all); a full product of the options would be 2^10 runs, every pair takes a handful. Each run trains two
optimizer steps of the tiny glm4 and its last checkpoint answers through predict.py's main, in this process; a run of
two ranks goes through the deepspeed launcher, a run of one rank through train.main in this process. The values:

    train      qlora (--train_type lora --quantization_bit 4) | all (full fine-tuning; LoRA's path is QLoRA's
               without the quantized base, and the rest of the suite trains it)
    packing    --packing off | on
    sp         --sequence_parallel_size 1 | 2
    samples    --sample_prompts off | on
    dev        --dev_path with --eval_step 1 off | on
    resume     off | on: the run stops after step 1 and a second run with --resume trains step 2
    ranks      1 | 2
    zero       ds_zero2_no_offload.json | ds_zero3_offload.json
    gc         --gradient_checkpointing off | on
    tools      the glm4 tool-call example data (data/tools_*.jsonl) off | on
"""
import itertools
import json

import pytest

import predict
import train
from conftest import ROOT, one_rank_env
from test_train import run_train

VALUES = {"train": ("qlora", "all"), "packing": (0, 1), "sp": (1, 2), "samples": (0, 1), "dev": (0, 1),
          "resume": (0, 1), "ranks": (1, 2), "zero": (2, 3), "gc": (0, 1), "tools": (0, 1)}
BASELINE = {"train": "all", "packing": 0, "sp": 1, "samples": 0, "dev": 0, "resume": 0, "ranks": 1, "zero": 2,
            "gc": 0, "tools": 0}


def row(text: str) -> dict:
    """A table row from "name=value ..." (options left out: BASELINE)."""
    values = dict(item.split("=") for item in text.split())
    return {name: type(BASELINE[name])(values.get(name, BASELINE[name])) for name in BASELINE}


# Found by a search for the fewest runs of two ranks (the launcher's start is most of a short run's cost) that cover
# every pair of values no refusal takes. test_the_runs_cover_every_pair checks the coverage.
RUNS = [
    row("train=qlora sp=2 resume=1 ranks=2 gc=1 tools=1"),
    row("sp=2 samples=1 dev=1 ranks=2 zero=3"),  # the run: sample answers under sequence parallelism
    row("train=qlora packing=1 ranks=2"),
    row("packing=1 samples=1 dev=1 resume=1 tools=1"),
    row("train=qlora samples=1 dev=1 gc=1"),
    row("packing=1 samples=1 resume=1 zero=3 gc=1"),
    row("dev=1 zero=3 gc=1 tools=1"),
]
# The pairs refused at start, with the line that refuses them: the options' own checks in parse_args, before
# anything loads. The run's other options are BASELINE's (two ranks where only the pair itself is to be refused).
REFUSED = [
    (("sp", 2, "ranks", 1), "--sequence_parallel_size 2 must divide the number of ranks (1)"),
    (("packing", 1, "sp", 2), "--sequence_parallel_size 2 does not work with --packing yet"),
    (("train", "qlora", "zero", 3), "--quantization_bit 4 with ZeRO-3 ("),
]


def refused_row(pair) -> dict:
    first, first_value, second, second_value = pair
    return {**BASELINE, "ranks": 2, first: first_value, second: second_value}


def row_id(values: dict) -> str:
    return "-".join(value if name == "train" else name if value == 1 and name != "ranks" else f"{name}{value}"
                    for name, value in values.items() if value != BASELINE[name] or name == "ranks")


def pairs_of(values: dict) -> set:
    return {(a, values[a], b, values[b]) for a, b in itertools.combinations(BASELINE, 2)}


def test_the_runs_cover_every_pair():
    """Every pair of values is in a run that trains, or is refused; no run holds a refused pair."""
    refused = {pair for pair, _ in REFUSED}
    everything = {(a, x, b, y) for a, b in itertools.combinations(BASELINE, 2) for x in VALUES[a] for y in VALUES[b]}
    covered = set().union(*(pairs_of(values) for values in RUNS))
    assert not covered & refused
    assert everything - refused - covered == set()


DATA = {0: ("data/train.jsonl", "data/dev.jsonl"), 1: ("data/tools_train.jsonl", "data/tools_test.jsonl")}
DS_FILES = {2: "ds_zero2_no_offload.json", 3: "ds_zero3_offload.json"}


def argv_of(values: dict, tmp_path) -> list[str]:
    train_path, dev_path = DATA[values["tools"]]
    argv = ["--mode", "glm4", "--train_path", ROOT / train_path, "--per_device_train_batch_size", 1,
            "--show_loss_step", 1, "--warmup_ratio", 0, "--max_new_tokens", 2,
            "--ds_file", ROOT / DS_FILES[values["zero"]]]
    # the tool samples' tools and calls fit whole (demo.sh's lengths for them)
    argv += ["--max_len", 2048, "--max_src_len", 1984] if values["tools"] else ["--max_len", 128, "--max_src_len", 96]
    if values["train"] == "qlora":
        argv += ["--train_type", "lora", "--quantization_bit", 4, "--lora_module_name", "query_key_value",
                 "--learning_rate", 2e-2]
    else:
        argv += ["--train_type", "all", "--learning_rate", 1e-3]
    if values["packing"]:
        argv.append("--packing")
    if values["sp"] > 1:
        argv += ["--sequence_parallel_size", values["sp"]]
    if values["samples"]:
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text('"你好"\n', encoding="utf-8")
        argv += ["--sample_prompts", prompts]
    if values["dev"]:
        argv += ["--dev_path", ROOT / dev_path, "--eval_step", 1]
    if values["gc"]:
        argv.append("--gradient_checkpointing")
    return [str(a) for a in argv]


def train_once(values: dict, base, out, argv, monkeypatch) -> str:
    """One train.py run: two ranks under the launcher (a short timeout: a hang fails the test, it does not stall the
    suite), else train.main in this process. Returns what the launched processes logged."""
    if values["ranks"] == 2:
        return run_train(base, out, *argv, ranks=2, timeout=400).stderr
    one_rank_env(monkeypatch)
    train.main(["--model_name_or_path", str(base), "--output_dir", str(out), *argv])
    return ""


@pytest.mark.parametrize("values,refusal", [pytest.param(values, None, id=row_id(values)) for values in RUNS] + [
    pytest.param(refused_row(pair), line, id="refused-" + row_id(refused_row(pair))) for pair, line in REFUSED])
def test_options_in_pairs(values, refusal, tiny_dirs, tmp_path, monkeypatch, capsys, caplog, one_thread,
                          real_f_linear):
    """Each row trains two steps and its checkpoint answers through predict.py, or is refused in one line."""
    base, out = tiny_dirs["glm4"], tmp_path / "out"
    argv = argv_of(values, tmp_path)
    if refusal:
        monkeypatch.setenv("WORLD_SIZE", str(values["ranks"]))
        with pytest.raises(SystemExit) as exit_info:
            train.main(["--model_name_or_path", str(base), "--output_dir", str(out), *argv])
        assert exit_info.value.code == 2
        assert refusal in capsys.readouterr().err.strip().splitlines()[-1]
        assert not out.exists()
        return
    caplog.set_level("INFO", logger="chatglm")
    if values["resume"]:
        train_once(values, base, out, argv + ["--max_steps", "1"], monkeypatch)
        logged = train_once(values, base, out, argv + ["--max_steps", "2", "--resume"], monkeypatch)
        assert "resumed from epoch-" in logged + caplog.text
    else:
        train_once(values, base, out, argv + ["--max_steps", "2"], monkeypatch)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in log if "loss" in r}) == [1, 2]
    evaluated = sorted({r["step"] for r in log if "eval_loss" in r})
    assert evaluated == ([1, 2] if values["dev"] else [])
    if values["samples"]:  # at each evaluation, and at the end of each run
        samples = [json.loads(line) for line in (out / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
        expected = [1, 2] if values["dev"] or values["resume"] else [2]
        assert [line["step"] for line in samples] == expected and all(line["prompt"] == "你好" for line in samples)
    else:
        assert not (out / "samples.jsonl").exists()

    checkpoint = out / train.last_checkpoint(str(out))
    assert train.checkpoint_step(checkpoint.name) == 2
    capsys.readouterr()
    assert predict.main(["--mode", "glm4", "--model_path", str(checkpoint), "--query", "你好", "--max_new_tokens",
                         "2", "--device", "cpu"]) == 0
