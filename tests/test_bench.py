"""bench/bench.py on the tiny shape (CPU): its cases go through train.py's own set-up, so what it measures is the
model as train.py trains it (training mode, checkpointing on, the base quantized or partitioned as train.py loads
it)."""
import importlib.util
import sys

import pytest

from conftest import ROOT, free_port, one_rank_env

sys.path.insert(0, str(ROOT / "bench"))


NEEDS_BITSANDBYTES = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                                        reason="bitsandbytes missing")


@pytest.mark.parametrize("case", ["lora:64x2:ckpt", "all:64x2:ckpt",
                                  pytest.param("qlora4:64x2:ckpt", marks=NEEDS_BITSANDBYTES)])
def test_bench_measures_the_model_train_py_trains(case, monkeypatch, one_thread, real_f_linear):
    import bench
    import train
    from transformers.modeling_layers import GradientCheckpointingLayer

    seen = []
    real_build_engine = train.build_engine

    def build_engine(*args, **kwargs):
        engine = real_build_engine(*args, **kwargs)
        blocks = [m for m in engine.module.modules() if isinstance(m, GradientCheckpointingLayer)]
        seen.append((engine.module.training, len(blocks), all(b.training and b.gradient_checkpointing
                                                               for b in blocks)))
        if case.startswith("all"):  # ZeRO-3 (ds_zero3_offload.json): loaded partitioned, as train.py loads it
            assert all(hasattr(p, "ds_id") for p in engine.module.parameters())
        return engine

    monkeypatch.setattr(train, "build_engine", build_engine)
    one_rank_env(monkeypatch)
    train.init_distributed()
    # The peer (GlmForCausalLM) runs for full training too, under the same ZeRO-3 config.
    models = bench.models_to_run(case, with_peer=case.startswith("all"))
    rows = bench.run_case(case, "tiny", "fp32", steps=1, warmup=0, models=models, peak_tflops=1.0)
    assert [row[0] for row in rows] == ["ours", "peer"][:1 + case.startswith("all")]
    assert all(row[1] > 0 for row in rows)  # tokens/s measured
    assert seen == [(True, bench.SHAPES["tiny"]["num_layers"], True)]


def test_each_model_is_measured_in_a_fresh_process(monkeypatch):
    """bench.py's table measures ours and the peer each in a new process, so neither carries the other's memory (a
    DeepSpeed engine outlives its last Python name). The parent's run_case is broken here: the row can only come
    from a child that imported bench afresh."""
    import bench

    def in_this_process(*args, **kwargs):
        raise AssertionError("measured in the parent process")

    monkeypatch.setattr(bench, "run_case", in_this_process)
    options = dict(shape="tiny", dtype_name="fp32", steps=1, warmup=0, peak_tflops=1.0)
    who, speed, *_ = bench.run_in_child("lora:64x2:ckpt", "peer", options)
    assert who == "peer" and speed > 0


def test_the_peer_can_run_under_its_own_deepspeed_json(monkeypatch, tmp_path, one_thread):
    """--peer_ds_file: ours under one JSON, the peer under another (e.g. ours with partial optimizer offload, the
    peer with the plain offload it was measured with)."""
    import json

    import bench
    import deepspeed
    import train

    peer_json = tmp_path / "peer.json"
    peer_json.write_text(json.dumps({**json.loads((ROOT / "ds_zero2_no_offload.json").read_text()),
                                     "gradient_clipping": 0.5}))
    seen = []
    real_initialize = deepspeed.initialize

    def initialize(*args, config, **kwargs):
        seen.append(config["gradient_clipping"])
        return real_initialize(*args, config=config, **kwargs)

    monkeypatch.setattr(deepspeed, "initialize", initialize)
    one_rank_env(monkeypatch)
    train.init_distributed()
    rows = bench.run_case("lora:64x2:ckpt", "tiny", "fp32", steps=1, warmup=0, models=["ours", "peer"],
                          peak_tflops=1.0, peer_ds_file=str(peer_json))
    assert [row[0] for row in rows] == ["ours", "peer"]
    assert seen == [1.0, 0.5]  # ours: ds_zero2_no_offload.json's clipping; the peer: its own JSON's


def test_device_timeline_counts_overlap_once_and_only_long_gaps_as_idle():
    import bench

    # two streams overlapping (0-10 and 5-12), a short gap (12-20: launch latency), a long one (30-250)
    busy, idle = bench.device_timeline([(250, 260), (5, 12), (0, 10), (20, 30)], long_gap_us=100)
    assert (busy, idle) == (12 + 10 + 10, 220)
    assert bench.device_timeline([(0, 100), (10, 20)]) == (100, 0)  # a kernel inside another's span


def test_profile_prints_the_summary_and_writes_the_trace(monkeypatch, tmp_path, capsys, one_thread):
    """--profile / --profile_dir: after timing, the profiled steps' summary and top ops, and a trace that loads."""
    import gzip
    import json

    import bench
    import train

    one_rank_env(monkeypatch)
    train.init_distributed()
    bench.run_case("lora:64x2:nockpt", "tiny", "fp32", steps=1, warmup=0, models=["ours"], peak_tflops=1.0,
                   profile=1, profile_dir=str(tmp_path))
    out = capsys.readouterr().out
    assert "lora:64x2:nockpt ours: profile: " in out and "profile| " in out and "aten::" in out
    trace = json.loads(gzip.open(tmp_path / "lora-64x2-nockpt-ours.json.gz").read())
    assert any(event.get("name", "").startswith("aten::") for event in trace["traceEvents"])


def test_real_case_runs_the_same_samples_padded_packed_and_padding_free(monkeypatch, one_thread):
    """lora:...:real: samples of the real lengths (bench/real_lengths.json) run four ways on the same tokens. With
    the same weights, ours padded and ours packed give the same window loss, as do the peer padded and the peer
    padding-free (DataCollatorWithFlattening): packing changes the layout, not what is computed; tokens/s counts
    real tokens only."""
    import bench
    import train

    lengths = bench.real_lengths()
    assert len(lengths) == 1441 and 150 < sum(lengths) / len(lengths) < 300  # short against --max_len 2048
    windows = bench.real_windows(1088, 256, 2, samples=16)
    # every way holds the same real tokens (ids are drawn from 3 up; 0 pads)
    tokens = {who: sum(int((b["input_ids"] != 0).sum()) for b in window) for who, (window, _) in windows.items()}
    assert set(tokens.values()) == {windows["ours"][1]}
    assert len(windows["ours-packed"][0]) < len(windows["ours"][0])  # fewer, fuller rows
    one_rank_env(monkeypatch)
    train.init_distributed()
    case = "lora:256x2:nockpt:real"
    rows = {row[0]: row for row in bench.run_case(case, "tiny", "fp32", steps=1, warmup=0,
                                                  models=bench.models_to_run(case, True), peak_tflops=1.0)}
    assert list(rows) == ["ours", "ours-packed", "peer", "peer-flat"]
    assert all(row[1] > 0 for row in rows.values())
    assert rows["ours-packed"][4] == pytest.approx(rows["ours"][4], rel=2e-6)
    assert rows["peer-flat"][4] == pytest.approx(rows["peer"][4], rel=2e-6)


def test_long_case_runs_at_tiny_shape(monkeypatch, one_thread):
    """--cases long (GLM-4-9B LoRA with checkpointing at 16K-64K tokens on a GPU) at the tiny shape: a world of one,
    --mode glm4, through train.py's set-up."""
    import bench
    import train

    assert bench.LONG_CASES == ["lora:16384x1:ckpt", "lora:32768x1:ckpt", "lora:65536x1:ckpt"]
    assert [bench.sequence_parallel_size(case) for case in bench.LONG_CASES_SP] == [2]
    one_rank_env(monkeypatch)
    train.init_distributed()
    rows = bench.run_case("lora:512x1:ckpt", "tiny", "fp32", steps=1, warmup=0, models=["ours"], peak_tflops=1.0,
                          mode="glm4")
    assert rows[0][0] == "ours" and rows[0][1] > 0


def test_long_case_with_sequence_parallelism_under_the_launcher(tmp_path):
    """`deepspeed --num_gpus 2 bench/bench.py --cases long`: the 128K case's ":sp2" form, here at the tiny shape on
    two CPU ranks; rank 0 alone prints the table."""
    import os
    import subprocess

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                             str(free_port()), str(ROOT / "bench/bench.py"), "--cases", "long",
                             "--shape", "tiny", "--steps", "1", "--warmup", "0"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| lora:512x1:ckpt:sp2 |")]
    assert len(rows) == 2, result.stdout[-3000:]  # printed as measured, then in the table; by rank 0 only
    assert float(rows[0].split("|")[2]) > 0
