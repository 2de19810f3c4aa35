"""QLoRA (--quantization_bit 4|8) on tiny checkpoints, on the CPU: train.py under the deepspeed launcher, the adapter
merged by merge_lora.py into the unquantized base, predict.py on base + adapter quantized, the combinations refused,
and the strict loader on quantized checkpoints. bitsandbytes 0.50 runs NF4 and LLM.int8 on the CPU."""
import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import quantization
from conftest import ROOT
from model import MODE, template
from test_train import common_args, dev_loss, read_log, run_train, train_in_process  # noqa: F401  (the fixture)
from inference import load_for_inference

pytest.importorskip("bitsandbytes")

# How far the first logged loss (step 1: LoRA's B starts at 0, so the model is the quantized base) may sit from the
# fp32 model's loss on the same window, relative. Measured on the tiny checkpoints (weights uniform in +-0.5, see
# model/tiny.py; bitsandbytes 0.50.2, CPU): NF4 up to 1.25e-2 (glm2; glm 6.4e-3, glm3 4.8e-3, glm4 6.1e-4),
# LLM.int8 up to 5.6e-4 (glm3; the others 1e-5 to 1e-4). Expected: NF4 with blocks of 64 leaves a relative RMS
# weight error of about 9%, LLM.int8's row-wise absmax about 0.6%, a ratio of ~15 that the loss deviations repeat
# (~20). With weights this large the logits are large too, so the same relative weight error moves the loss by
# about a percent, not a few 1e-4 as with std-0.02 weights. The bounds leave ~3x headroom; a base that was not
# quantized at all passes them too, which is why the stored bytes are checked separately.
FIRST_LOSS_BOUND = {4: 4e-2, 8: 2e-3}
DESCRIBE = re.compile(r"quantized base: (\d+) linear layers in (\d)-bit, (\d+) weights stored in (\d+) bytes")


def block_linear_weights(base_dir) -> int:
    """Weights of the transformer blocks' Linear layers in the checkpoint: what QLoRA quantizes."""
    weights = load_file(Path(base_dir, "model.safetensors"))
    return sum(t.numel() for k, t in weights.items() if ".layers." in k and k.endswith(".weight") and t.dim() == 2)


def assert_stored_quantized(quantized_layers, stored, weights, bits, base_dir, layers):
    """The bytes the quantized Linear layers hold: a full-size weight anywhere would break the upper bound (bf16 is 2
    bytes a weight, fp32 4)."""
    assert quantized_layers == 4 * layers  # query_key_value, dense, dense_h_to_4h, dense_4h_to_h of every block
    assert weights == block_linear_weights(base_dir)
    if bits == 4:
        # half a byte a weight; an 8-bit absmax per block of 64 (double quantization), an fp32 scale per 256 of
        # those; per layer the 16-entry NF4 code book and the 256-entry one of the absmax, in fp32 (+ rounding)
        assert weights / 2 <= stored <= weights * (1 / 2 + 1 / 64 + 4 / (64 * 256)) + quantized_layers * 4 * 273
    else:  # a byte a weight, plus an fp32 scale per output row (every layer here has >= 64 inputs)
        assert weights <= stored <= weights * (1 + 4 / 64)


def window_loss(mode, base_dir, model, tokenizer, batch_size, world_size):
    """The loss train.py logs at step 1 for a model that does not change within the step: summed over the first
    accumulation window (2 micro-batches) of every rank, per labelled token."""
    import train
    args = train.parse_args(["--model_name_or_path", str(base_dir), "--mode", mode, "--output_dir", "-",
                             "--train_path", str(ROOT / "data/train.jsonl"), "--max_len", "256",
                             "--max_src_len", "200", "--per_device_train_batch_size", str(batch_size)])
    dataset, _ = train.build_data(args, tokenizer)
    total = tokens = 0.0
    for rank in range(world_size):
        loader = train.make_loader(dataset, args, rank, world_size, True, tokenizer.pad_token_id)
        loader.batch_sampler.set_epoch(0)
        batches = iter(loader)
        for batch in (next(batches), next(batches)):
            with torch.no_grad():
                total += model(**batch, reduction="sum").loss.item()
            tokens += (batch["labels"][:, 1:] != -100).sum().item()
    return total / tokens


def merge_and_compare(mode, base_dir, adapter, unmerged, tokenizer, merged_dir):
    """merge_lora.py (its main, in this process) on the adapter: the merged full-precision model is base + adapter."""
    import merge_lora
    assert merge_lora.main(["--mode", mode, "--ori_model_dir", str(base_dir), "--model_dir", str(adapter),
                            "--output_dir", str(merged_dir)]) == 0
    merged = MODE[mode].model.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert all(p.dtype == torch.float32 and type(p) is torch.nn.Parameter for p in merged.parameters())
    prompt = torch.tensor([template.encode_prompt(tokenizer, mode, "发动机水温高，风扇低速转动。")])
    with torch.no_grad():
        expected = unmerged(prompt).logits
        # merge_lora.py's own fp32 rule: 1e-5 relative to the logits' scale (the tiny logits reach tens)
        assert (merged(prompt).logits - expected).abs().max().item() < 1e-5 * max(1.0, expected.abs().max().item())


# One case per code path (6 optimizer steps each, gradient checkpointing): both model files (ChatGLM-6B's
# modeling_chatglm.py, the glm2/glm3/glm4 modeling_chatglm2.py), both widths (quantization.py: NF4, LLM.int8), one
# rank (`python train.py`) and two (the deepspeed launcher, ZeRO-2: ds_zero2_no_offload.json). The other
# combinations run the same lines: quantization.py does not look at the mode.
CASES = [("glm", 4, 1), ("glm3", 4, 2), ("glm4", 8, 1)]


@pytest.mark.parametrize("mode,bits,ranks", CASES, ids=[f"{m}-{b}bit-{r}rank" for m, b, r in CASES])
def test_qlora_trains_merges_and_predicts(mode, bits, ranks, tiny_dirs, tmp_path, caplog, train_in_process):
    base_dir = tiny_dirs[mode]
    out = tmp_path / "out"
    batch = 4 // ranks  # 24 samples / (batch x ranks x 2 accumulation) = 3 steps an epoch either way
    args = [*common_args(mode, "lora", epochs=2), "--quantization_bit", bits, "--gradient_checkpointing",
            "--per_device_train_batch_size", batch, "--ds_file", ROOT / "ds_zero2_no_offload.json"]
    if ranks == 1:  # train.main in this process
        caplog.set_level(logging.INFO)
        train_in_process("--model_name_or_path", base_dir, "--output_dir", out, *args)
        output = caplog.text
    else:
        result = run_train(base_dir, out, *args, ranks=ranks)
        output = result.stdout + result.stderr
    # the base is stored quantized once DeepSpeed has set up the model (train.py checks and logs it in bytes)
    found = DESCRIBE.search(output)
    assert found and int(found.group(2)) == bits, output[-3000:]
    layers, _, weights, stored = (int(g) for g in found.groups())
    config = json.loads(Path(base_dir, "config.json").read_text())
    assert_stored_quantized(layers, stored, weights, bits, base_dir, config["num_layers"])

    losses, evals = read_log(out)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and all(l == l for l in losses.values()), losses
    fp32_model, tokenizer = load_for_inference(mode, str(base_dir))
    fp32_loss = window_loss(mode, base_dir, fp32_model, tokenizer, batch, ranks)
    assert abs(losses[1] - fp32_loss) <= FIRST_LOSS_BOUND[bits] * fp32_loss, (losses[1], fp32_loss)

    # an ordinary LoRA adapter: merge_lora.py merges it into the full-precision base (the standard QLoRA merge)
    adapter = out / "epoch-2-step-6"
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    saved = load_file(adapter / "adapter_model.safetensors")
    assert saved and all("lora_" in k and t.dtype == torch.float32 for k, t in saved.items())
    assert json.loads((adapter / "training_args.json").read_text())["quantization_bit"] == bits  # the run record
    unmerged, tokenizer = load_for_inference(mode, str(adapter), quantization_bit=0)  # the fp32 base + adapter
    merge_and_compare(mode, base_dir, adapter, unmerged, tokenizer, tmp_path / "merged")
    merge_report = json.loads((tmp_path / "merged" / "merge_lora.json").read_text())
    assert merge_report["quantization_bit"] == bits and merge_report["max_abs_logit_difference_vs_trained"] > 0

    # predict.py loads base + adapter with the base quantized again
    quantized, _ = load_for_inference(mode, str(adapter), quantization_bit=bits)
    report = quantization.check_storage(quantized, bits)
    assert_stored_quantized(report["layers"], report["stored_bytes"], report["weights"], bits, base_dir,
                            config["num_layers"])
    # the saved adapter is what train.py trained (on every rank): over the same quantized base it reproduces the dev
    # loss train.py measured at the end
    assert abs(dev_loss(quantized, tokenizer, mode, ROOT / "data/dev.jsonl", 4) - evals[-1]) < 1e-4 * evals[-1]
    # it learns: the (deterministic) held-out loss falls below the quantized base's (as test_train's LoRA runs: 2
    # epochs; after 1 epoch at this learning rate glm3's dev loss is still above the base's, in fp32 LoRA too)
    quantized_base, _ = load_for_inference(mode, str(base_dir), quantization_bit=bits)
    assert evals[-1] < dev_loss(quantized_base, tokenizer, mode, ROOT / "data/dev.jsonl", 4) - 0.005, evals
    lora = {n: p for n, p in quantized.named_parameters() if "lora_" in n}
    assert len(lora) == len(saved) and all(p.dtype == torch.float32 for p in lora.values())
    import predict
    caplog.set_level(logging.INFO, logger="chatglm")
    assert predict.main(["--mode", mode, "--model_path", str(adapter), "--query", "发动机水温高",
                         "--max_new_tokens", "4"]) == 0  # no flag: the base quantized as the adapter was trained
    assert f"(lora, base {Path(base_dir)}) on cpu as float32, base {bits}-bit (as the adapter was trained" \
        in caplog.text


@pytest.mark.parametrize("extra,message", [
    (["--train_type", "all"], "--quantization_bit 4 trains LoRA adapters over a quantized base: use --train_type "
                              "lora, not all"),
    (["--train_type", "ptuning"], "use --train_type lora, not ptuning"),
    (["--train_type", "freeze"], "use --train_type lora, not freeze"),
    (["--train_type", "lora", "--ds_file", str(ROOT / "ds_zero3_offload.json")],
     "--quantization_bit 4 with ZeRO-3"),
])
def test_unsupported_combinations_stop_with_one_line(extra, message, tiny_dirs, tmp_path, capsys):
    import train
    with pytest.raises(SystemExit) as stop:  # train.py's main, in this process
        train.main(["--model_name_or_path", str(tiny_dirs["glm3"]), "--output_dir", str(tmp_path / "out"), "--mode",
                    "glm3", "--train_path", str(ROOT / "data/train.jsonl"), "--quantization_bit", "4", *extra])
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert stop.value.code == 2 and len(errors) == 1 and message in errors[0], stderr
    assert quantization.SUPPORTED in errors[0]
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# the set-up check and the strict loader
# ---------------------------------------------------------------------------------------------------------------
def test_storage_check_catches_a_dequantized_layer(tiny_dirs):
    model, _ = load_for_inference("glm2", str(tiny_dirs["glm2"]), quantization_bit=4)
    report = quantization.check_storage(model, 4)
    assert report["layers"] == 8
    for name, param in model.named_parameters():  # only the block Linears are packed; the rest as loaded
        if name.endswith("output_layer.weight") or "embedding" in name or "layernorm" in name:
            assert param.dtype == torch.float32 and type(param) is torch.nn.Parameter, name
    layer = model.transformer.encoder.layers[1].mlp
    layer.dense_4h_to_h = torch.nn.Linear(layer.dense_4h_to_h.in_features, layer.dense_4h_to_h.out_features)
    with pytest.raises(RuntimeError, match=r"encoder\.layers\.1\.mlp\.dense_4h_to_h\.weight is Parameter float32"):
        quantization.check_storage(model, 4)
    # a quantized LM head is caught too (its chunked loss needs the floating-point weight)
    import bitsandbytes as bnb
    model, _ = load_for_inference("glm2", str(tiny_dirs["glm2"]), quantization_bit=4)
    model.transformer.output_layer = bnb.nn.Linear4bit(64, model.config.padded_vocab_size, bias=False)
    with pytest.raises(RuntimeError, match=r"transformer\.output_layer \(the LM head\) is Linear4bit"):
        quantization.check_storage(model, 4)


@pytest.mark.parametrize("bits", [4, 8])
def test_strict_loader_on_quantized_checkpoints(bits, tiny_dirs, tmp_path):
    """A checkpoint saved quantized (bitsandbytes' absmax / quant_map / quant_state, or SCB / weight_format beside
    the weights) loads through the strict check; a stray weight is still refused, and a damaged quantization state
    fails in one line."""
    from model.modeling_base import is_quantization_state

    model_class = MODE["glm2"].model
    quantized = quantization.load_quantized(model_class, tiny_dirs["glm2"], bits, torch.float32, "cpu")
    saved = tmp_path / "saved"
    quantized.save_pretrained(saved)
    shutil.copy(Path(tiny_dirs["glm2"], "tokenizer.model"), saved)
    keys = set(load_file(saved / "model.safetensors"))
    state_keys = {k for k in keys if k.endswith(quantization_suffixes(bits))}
    assert state_keys and all(is_quantization_state(quantized, k) for k in state_keys)
    reloaded = model_class.from_pretrained(saved)
    quantization.check_storage(reloaded, bits)
    # ordinary loads stay strict: the same names mean nothing on a model that is not quantized
    plain = model_class.from_pretrained(tiny_dirs["glm2"])
    assert not any(is_quantization_state(plain, k) for k in state_keys)
    assert not is_quantization_state(quantized, "transformer.output_layer.weight.absmax")

    weights = load_file(saved / "model.safetensors")
    weights["transformer.encoder.layers.0.extra.weight"] = torch.zeros(2)
    save_file(weights, saved / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unexpected weights \['transformer.encoder.layers.0.extra.weight'\]"):
        model_class.from_pretrained(saved)
    del weights["transformer.encoder.layers.0.extra.weight"]
    del weights[sorted(state_keys)[0]]
    save_file(weights, saved / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="could not be converted") as error:
        model_class.from_pretrained(saved)
    assert "\n" not in str(error.value)


def quantization_suffixes(bits):
    return (".weight.absmax", ".weight.quant_map", ".weight.nested_absmax", ".weight.nested_quant_map",
            ".weight.quant_state.bitsandbytes__nf4") if bits == 4 else (".SCB", ".weight_format")


# ---------------------------------------------------------------------------------------------------------------
# a QLoRA adapter after training: merge_lora.py and predict.py know what it was trained on (issue 19, point 9)
# ---------------------------------------------------------------------------------------------------------------
def qlora_adapter(mode, base_dir, output_dir, bits) -> Path:
    """A LoRA adapter whose run record says --quantization_bit `bits`, as train.py's training_args.json does (its
    run_record holds every flag; test_qlora_trains_merges_and_predicts checks that on real runs)."""
    from test_merge_lora import make_lora_adapter

    adapter = Path(make_lora_adapter(mode, base_dir, output_dir))
    record = json.loads((adapter / "training_args.json").read_text())
    (adapter / "training_args.json").write_text(json.dumps({**record, "quantization_bit": bits}))
    return adapter


def check_prompt_logits(model, mode, tokenizer):
    import merge_lora
    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids])).logits[0].float()
                for ids in merge_lora.check_prompt_ids(tokenizer, mode)]


@pytest.mark.parametrize("bits", [4, 8])
def test_merge_reports_the_difference_to_what_was_trained(bits, tiny_dirs, tmp_path, capsys, one_thread):
    """merge_lora.py on a QLoRA adapter: checked against the full-precision base + adapter (what it merges), and
    compared with what was trained (the adapter on the quantized base); merge_lora.json records both and the bits."""
    import merge_lora
    mode = "glm2"
    adapter = qlora_adapter(mode, tiny_dirs[mode], tmp_path / "adapter", bits)
    out = tmp_path / "merged"
    assert merge_lora.main(["--mode", mode, "--ori_model_dir", str(tiny_dirs[mode]), "--model_dir", str(adapter),
                            "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "merge_lora.json").read_text())
    assert report["quantization_bit"] == bits
    assert report["merge_check"]["share_of_rounding_bound"] <= 1.0  # the check: merged = fp32 base + adapter
    assert f"merged vs what was trained ({bits}-bit base + adapter): " in printed

    # the reported difference is the merged model's against the adapter on the base quantized as in training
    trained, tokenizer = load_for_inference(mode, str(adapter))  # quantized as trained (the default)
    assert quantization.check_storage(trained, bits)["bits"] == bits
    merged = MODE[mode].model.from_pretrained(str(out)).eval()
    expected = max((a - b).abs().max().item() for a, b in zip(check_prompt_logits(merged, mode, tokenizer),
                                                               check_prompt_logits(trained, mode, tokenizer)))
    assert report["max_abs_logit_difference_vs_trained"] == pytest.approx(expected, rel=1e-3)
    # and it is the base's quantization error, far above the merge's own rounding
    assert report["max_abs_logit_difference_vs_trained"] > 100 * report["max_abs_logit_difference"]


def test_predict_loads_a_qlora_adapter_on_the_base_quantized_as_trained(tiny_dirs, tmp_path, caplog, capsys,
                                                                          one_thread):
    """predict.py (and load_for_inference) on a QLoRA adapter: by default the base quantized as training_args.json
    records, --quantization_bit 0 the full-precision base; the log says which. A plain adapter stays unquantized."""
    import predict
    mode, bits = "glm3", 4
    base = Path(tiny_dirs[mode])
    adapter = qlora_adapter(mode, base, tmp_path / "adapter", bits)
    caplog.set_level(logging.INFO, logger="chatglm")
    query = ["--mode", mode, "--model_path", str(adapter), "--query", "发动机水温高", "--max_new_tokens", "4"]

    assert predict.main(query) == 0
    assert (f"(lora, base {base}) on cpu as float32, base 4-bit (as the adapter was trained (training_args.json); "
            f"--quantization_bit 0 loads it unquantized)") in caplog.text
    model, _ = load_for_inference(mode, str(adapter))
    assert quantization.check_storage(model, bits)["layers"] == 8

    caplog.clear()
    assert predict.main(query + ["--quantization_bit", "0"]) == 0
    assert (f"(lora, base {base}) on cpu as float32, base not quantized (--quantization_bit 0; the adapter was "
            f"trained on a 4-bit base)") in caplog.text
    model, _ = load_for_inference(mode, str(adapter), quantization_bit=0)
    assert not quantization.quantized_layers(model)

    caplog.clear()
    assert predict.main(query + ["--quantization_bit", "8"]) == 0
    assert "base 8-bit (--quantization_bit 8; the adapter was trained on a 4-bit base)" in caplog.text

    # an adapter trained without quantization loads on the full-precision base, as before
    from test_merge_lora import make_lora_adapter
    plain = make_lora_adapter(mode, base, tmp_path / "plain")
    model, _ = load_for_inference(mode, plain)
    assert not quantization.quantized_layers(model)
