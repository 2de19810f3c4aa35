"""GLM-4.5 / 4.6 / 4.7 (mode glm4-moe, Glm4MoeForCausalLM) and GLM-4.7-Flash (mode glm4-moe-lite,
Glm4MoeLiteForCausalLM) on transformers' own classes.

External rules followed here:
- the chat templates are the official ones kept in model/templates/ (glm4_6_moe.jinja: GLM-4.6's, the format of
  GLM-4.5 / 4.5-Air; glm4_7_flash.jinja: GLM-4.7-Flash's; origins in model/templates/PROVENANCE.md), rendered by
  transformers' `apply_chat_template`; OpenAI-style `tool_calls` / `tool` messages are what those templates read;
- transformers 5.24's models/glm4_moe*/modeling_*.py: fused expert parameters mlp.experts.gate_up_proj /
  down_proj, router mlp.gate (no auxiliary loss unless the config sets one), MTP layers not built;
- PEFT 0.21's LoraConfig(target_parameters=...) for the fused 3-D expert tensors;
- labels as THUDM's GLM-4 finetune_demo labels the GLM-4 format (model/chat_template.py).
"""
import json
import os

import pytest

import same_training
from test_glm4_0414 import run_train, train_args  # the same tiny run as the 0414 family's
from conftest import ROOT, free_port

MODES = ("glm4-moe", "glm4-moe-lite")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather of a city",
                                             "parameters": {"type": "object",
                                                            "properties": {"city": {"type": "string"},
                                                                           "days": {"type": "integer"}}}}}]
# (our messages, the same conversation as the official templates take it: OpenAI tool_calls / tool results)
BATTERY = [
    ([{"role": "user", "content": "发动机水温高怎么办？"}, {"role": "assistant", "content": "检查冷却液。"}],
     [{"role": "user", "content": "发动机水温高怎么办？"}, {"role": "assistant", "content": "检查冷却液。"}]),
    ([{"role": "system", "content": "You are a mechanic."}, {"role": "user", "content": "Engine hot?"},
      {"role": "assistant", "content": "Check the fan."}, {"role": "user", "content": "还有呢？"},
      {"role": "assistant", "content": "看看水泵。"}],
     None),
    # parallel calls, their results, then a thinking answer
    ([{"role": "system", "content": "", "tools": TOOLS}, {"role": "user", "content": "Paris and Rome?"},
      {"role": "assistant", "metadata": "get_weather", "content": '{"city": "Paris", "days": 2}'},
      {"role": "assistant", "metadata": "get_weather", "content": '{"city": "Rome"}'},
      {"role": "observation", "content": '{"sky": "sunny"}'}, {"role": "observation", "content": '{"sky": "rain"}'},
      {"role": "assistant", "content": "Paris sunny, Rome rain.", "reasoning_content": "two results"}],
     [{"role": "user", "content": "Paris and Rome?"},
      {"role": "assistant", "content": "", "tool_calls": [
          {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}},
          {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
      {"role": "tool", "content": '{"sky": "sunny"}'}, {"role": "tool", "content": '{"sky": "rain"}'},
      {"role": "assistant", "content": "Paris sunny, Rome rain.", "reasoning_content": "two results"}]),
    # thinking in history (dropped by the template before the last user turn) and inline <think> in the final turn
    ([{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2", "reasoning_content": "一加一"},
      {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>二加二</think>4"}],
     None),
]


@pytest.fixture(scope="module", params=MODES)
def tiny(request, tmp_path_factory):
    from model.glm4_moe import write_tiny_checkpoint
    return request.param, write_tiny_checkpoint(request.param, str(tmp_path_factory.mktemp(request.param) / "t"))


def official_ids(tokenizer, messages, tools, generation_prompt=False):
    ids = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=generation_prompt,
                                        tokenize=True, return_dict=True)["input_ids"]
    return list(ids)


def test_tiny_checkpoint_loads_without_remote_code_mtp_ignored(tiny, caplog):
    """AutoModelForCausalLM / AutoTokenizer load it as shipped; the MTP layer's tensors are in the file, ignored on
    load with one log line, absent from the model; the template and tool tokens are the official ones."""
    import logging

    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from model.glm4_moe import FORMAT_TOKENS, read_template
    mode, path = tiny
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    assert config["model_type"] == mode.replace("-", "_").replace("glm4_moe", "glm4_moe")
    assert config["num_nextn_predict_layers"] == 1 and config["first_k_dense_replace"] == 1
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        assert any(name.startswith("model.layers.3.") for name in f.keys())
    with caplog.at_level(logging.INFO, logger="chatglm"):
        model = AutoModelForCausalLM.from_pretrained(path)
    said = [r.getMessage() for r in caplog.records if "multi-token-prediction" in r.getMessage()]
    assert len(said) == 1 and "model.layers.3" in said[0]
    assert not any(name.startswith("model.layers.3.") for name in model.state_dict())
    assert type(model).__name__ == ("Glm4MoeForCausalLM" if mode == "glm4-moe" else "Glm4MoeLiteForCausalLM")
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.chat_template == read_template(mode)
    for token in FORMAT_TOKENS:
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1, token


@pytest.mark.parametrize("index", range(len(BATTERY)))
def test_training_ids_are_the_official_template(tiny, index):
    """Our ids == apply_chat_template(tokenize=True) of the official template on the conversation written the way
    the template takes it; learned tokens are the assistant turns (and the stop token after each)."""
    from transformers import AutoTokenizer

    from model import template
    mode, path = tiny
    tokenizer = AutoTokenizer.from_pretrained(path)
    ours, theirs = BATTERY[index]
    ids, labels, answer_start = template.encode_messages(tokenizer, mode, ours)
    tools = next((m["tools"] for m in ours if m.get("tools")), None)
    theirs = theirs or [m for m in ours if m.get("content") or m["role"] != "system"]
    expected = official_ids(tokenizer, theirs, tools)
    assert ids[:-1] == expected and tokenizer.convert_ids_to_tokens(ids[-1]) == "<|user|>"
    # the prompt chat() answers: the template's generation prompt (GLM-4.7-Flash renders a turn without thinking as
    # `<|assistant|></think>`, its enable_thinking=False prompt; GLM-4.5's would append /nothink to the user turn)
    thinks = "</think>" in ours[-1]["content"] or bool(ours[-1].get("reasoning_content"))
    switch = {"enable_thinking": False} if mode == "glm4-moe-lite" and not thinks else {}
    prompt = list(tokenizer.apply_chat_template(theirs[:-1], tools=tools, add_generation_prompt=True, tokenize=True,
                                                return_dict=True, **switch)["input_ids"])
    assert ids[:len(prompt)] == prompt and answer_start <= len(prompt)
    assert tokenizer.convert_ids_to_tokens(ids[answer_start - 1]) == "<|assistant|>" or answer_start == len(prompt)
    learned = tokenizer.decode([t for t, label in zip(ids, labels) if label != -100])
    final = ours[-1]
    assert final["content"].split("</think>")[-1] in learned and learned.endswith("<|user|>")
    assert ("Check the fan." in learned) == (index == 1)  # every assistant turn is learned
    if final.get("reasoning_content"):
        assert "<think>two results</think>" in learned
    if index == 2:
        assert learned.count("<tool_call>") == 2 and "<|observation|>" in learned  # the call turn stops there


def test_calls_parse_back_to_name_and_parameters():
    """What the model writes in either template's call form reads back as {"name", "parameters"}; thinking apart."""
    from model import template
    for response in ("<think>need weather</think>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n"
                     "<arg_value>Paris</arg_value>\n<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n</tool_call>",
                     "need weather</think><tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value>"
                     "<arg_key>days</arg_key><arg_value>2</arg_value></tool_call>"):
        for mode in MODES:
            call, history = template.process_response(mode, response, [{"role": "user", "content": "q"}])
            assert call["name"] == "get_weather" and call["parameters"] == {"city": "Paris", "days": 2}
            assert history[-1] == {"role": "assistant", "metadata": "get_weather",
                                   "content": '{"city": "Paris", "days": 2}', "reasoning_content": "need weather"}
    calls, _ = template.process_response("glm4-moe-lite", "<tool_call>a<arg_key>x</arg_key><arg_value>1</arg_value>"
                                                           "</tool_call><tool_call>b</tool_call>", [])
    assert [(c["name"], c["parameters"]) for c in calls] == [("a", {"x": 1}), ("b", {})]
    answer, history = template.process_response("glm4-moe", "\n<think>hm</think>\nHello.", [])
    assert answer == "Hello." and history[-1]["reasoning_content"] == "hm"


def test_lora_on_attention_and_experts_merge_equals_base_plus_adapter(tiny, tmp_path, monkeypatch, one_thread,
                                                                      capsys):
    """--mode left out (detected from model_type); LoRA on attention, MLPs and the fused experts (PEFT
    target_parameters), the router frozen; merge_lora.py's output loads with AutoModelForCausalLM and equals
    base + adapter."""
    import torch
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    import merge_lora
    mode, path = tiny
    saved = run_train(monkeypatch, *train_args(path, tmp_path / "out"))
    assert f"using --mode {mode}" in capsys.readouterr().out
    with open(os.path.join(saved, "adapter_config.json")) as f:
        adapter = json.load(f)
    assert {name.rsplit(".", 1)[-1] for name in adapter["target_parameters"]} == {"gate_up_proj", "down_proj"}
    assert "o_proj" in adapter["target_modules"] and not adapter.get("modules_to_save")
    with safe_open(os.path.join(saved, "adapter_model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert any("mlp.experts" in n for n in names) and not any("mlp.gate." in n for n in names)
    merged = tmp_path / "merged"
    merge_lora.main(["--ori_model_dir", path, "--model_dir", saved, "--output_dir", str(merged)])
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), saved)(ids).logits
        base = AutoModelForCausalLM.from_pretrained(path)(ids).logits
        loaded = AutoModelForCausalLM.from_pretrained(merged)
        got = loaded(ids).logits
    assert type(loaded).__name__.startswith("Glm4Moe")
    assert not torch.allclose(expected, base)  # the adapter changed something
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)  # fp32 rounding of W + scale * B @ A


def test_train_router_saves_the_router_in_the_adapter(tiny, tmp_path, monkeypatch, one_thread):
    from safetensors import safe_open
    mode, path = tiny
    if mode != "glm4-moe":
        pytest.skip("one class is enough for the flag")
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import merge_lora
    saved = run_train(monkeypatch, *train_args(path, tmp_path / "out", "--train_router", "--max_steps", 1))
    with safe_open(os.path.join(saved, "adapter_model.safetensors"), "pt") as f:
        assert any("mlp.gate" in n and "gate_proj" not in n for n in f.keys())
    merged = tmp_path / "merged"  # the trained router replaces the base's in the merged checkpoint
    merge_lora.main(["--ori_model_dir", path, "--model_dir", saved, "--output_dir", str(merged)])
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), saved)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(merged)(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    with safe_open(os.path.join(merged, "model.safetensors"), "pt") as f, \
            safe_open(os.path.join(path, "model.safetensors"), "pt") as base:
        router = "model.layers.1.mlp.gate.weight"
        assert not torch.equal(f.get_tensor(router), base.get_tensor(router))  # trained, and merged in


@pytest.mark.parametrize("train_type,extra", [("freeze", []), ("all", []), ("lora", ["--quantization_bit", 4])])
def test_other_train_types_train_and_chat(tiny, tmp_path, monkeypatch, one_thread, train_type, extra):
    """freeze (last layers), all, QLoRA 4-bit (bitsandbytes quantizes the Linear layers; the fused experts stay
    unquantized) train through train.main with the router frozen, save in the shipped layout and answer chat()."""
    import torch
    from safetensors import safe_open

    from inference import load_for_inference
    mode, path = tiny
    saved = run_train(monkeypatch, *train_args(path, tmp_path / "out", "--train_type", train_type, *extra))
    if train_type != "lora":  # full save under the official per-expert names; router unchanged (frozen)
        with safe_open(os.path.join(saved, "model.safetensors"), "pt") as f, \
                safe_open(os.path.join(path, "model.safetensors"), "pt") as base:
            assert set(f.keys()) == set(base.keys())
            router = "model.layers.2.mlp.gate.weight"
            torch.testing.assert_close(f.get_tensor(router), base.get_tensor(router), rtol=0, atol=0)
    model, tokenizer = load_for_inference(mode, saved)
    response, history = model.chat(tokenizer, "发动机", max_new_tokens=3, do_sample=False)
    assert isinstance(response, (str, dict, list)) and history[0] == {"role": "user", "content": "发动机"}


@pytest.mark.parametrize("final", [
    {"role": "assistant", "metadata": "get_weather", "content": '{"city": "Paris", "days": 2}'},
    {"role": "assistant", "content": "Sunny.", "reasoning_content": "the tool said sunny"}])
def test_tool_call_and_thinking_round_trip_through_chat(tiny, monkeypatch, final):
    """What training teaches for a call turn / a thinking turn (the learned ids after the prompt), generated back,
    comes out of chat() as our message again: {"name", "parameters"} with the call in the history, or the answer
    with its thinking as reasoning_content."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from model import glm4_moe, template
    mode, path = tiny
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = glm4_moe.with_chat(AutoModelForCausalLM.from_pretrained(path))
    system = {"role": "system", "content": "", "tools": TOOLS}
    messages = [system, {"role": "user", "content": "Paris?"}, final]
    ids, labels, _ = template.encode_messages(tokenizer, mode, messages)
    prompt = template.encode_prompt(tokenizer, mode, "Paris?", [system])
    assert ids[:len(prompt)] == prompt or mode == "glm4-moe-lite"  # (4.7: `<think>` cue vs `</think>` turn)
    written = [t for t, label in zip(ids, labels) if label != -100]
    if mode == "glm4-moe-lite" and tokenizer.convert_ids_to_tokens(prompt[-1]) == "<think>" \
            and tokenizer.convert_ids_to_tokens(written[0]) == "<think>":
        written = written[1:]  # the prompt opened the thinking already

    def generate(input_ids, **kwargs):
        assert input_ids[0].tolist() == prompt
        return torch.tensor([prompt + written])
    monkeypatch.setattr(model, "generate", generate)
    response, history = model.chat(tokenizer, "Paris?", history=[system], do_sample=False)
    if final.get("metadata"):
        assert response["name"] == "get_weather" and response["parameters"] == {"city": "Paris", "days": 2}
        assert {k: history[-1][k] for k in ("role", "metadata", "content")} == final
    else:
        assert response == "Sunny." and history[-1]["reasoning_content"] == "the tool said sunny"


def test_router_aux_loss_from_config_is_added_and_logged_apart(tmp_path, monkeypatch, one_thread, caplog):
    """router_aux_loss_coef in config.json (the official GLM-4.5 configs set none): the load-balancing loss of
    transformers' load_balancing_loss_func is added, and logged on its own."""
    import logging
    import shutil

    from model.glm4_moe import write_tiny_checkpoint
    path = write_tiny_checkpoint("glm4-moe", str(tmp_path / "tiny"))
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["router_aux_loss_coef"] = 0.01
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    with caplog.at_level(logging.INFO, logger="chatglm"):
        run_train(monkeypatch, *train_args(path, tmp_path / "out", "--max_steps", 1))
    said = "\n".join(r.getMessage() for r in caplog.records)
    assert "router_aux_loss_coef 0.01 from config.json" in said and "router aux " in said
    shutil.rmtree(path)


def test_zero3_marks_the_moe_blocks_as_leaf_modules(tiny):
    """deepspeed.utils.set_z3_leaf_modules on the MoE block class (DeepSpeed's documented fix for ZeRO-3 with routed
    experts); the dense layer's MLP is no leaf."""
    from deepspeed.utils import get_z3_leaf_modules
    from transformers import AutoModelForCausalLM

    from model.glm4_moe import set_zero3_leaf_modules
    mode, path = tiny
    model = AutoModelForCausalLM.from_pretrained(path)
    names = set_zero3_leaf_modules(model)
    assert names == (["Glm4MoeMoE"] if mode == "glm4-moe" else ["Glm4MoeLiteMoE"])
    leaves = get_z3_leaf_modules(model)
    assert len(leaves) == 2 and all(type(leaf).__name__ == names[0] for leaf in leaves)


def test_thinking_mask_leaves_the_final_thinking_unlearned(tiny):
    """--thinking mask: the final turn's thinking (rendered by the template itself here) is context, the answer and
    the stop token are learned; learn: both."""
    from transformers import AutoTokenizer

    from model import template
    mode, path = tiny
    tokenizer = AutoTokenizer.from_pretrained(path)
    messages = BATTERY[3][0]
    learned = {}
    for thinking in ("learn", "mask"):
        ids, labels, _ = template.encode_messages(tokenizer, mode, messages, thinking=thinking)
        learned[thinking] = tokenizer.decode([t for t, label in zip(ids, labels) if label != -100])
    assert "二加二" in learned["learn"] and "二加二" not in learned["mask"]
    assert learned["mask"].endswith("4<|user|>") and "2" in learned["mask"]


def test_zero3_on_two_cpu_ranks_trains_what_one_rank_trains(tmp_path, monkeypatch, one_thread):
    """ZeRO-3 (ds_zero3_offload.json, the MoE blocks as leaf modules) on 2 CPU ranks x 1 sample against 1 rank x 2
    samples: the same losses step by step and the same saved weights, within fp32 reduction-order rounding."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    from model.glm4_moe import write_tiny_checkpoint
    path = write_tiny_checkpoint("glm4-moe", str(tmp_path / "tiny"))
    # SGD-like steps (same_training.linear_steps): weights after AdamW's first steps would carry the machine's
    # rounding noise of near-zero gradients (a key bias's) as +-lr steps
    common = ["--train_path", ROOT / "data/train.jsonl", "--max_len", 256, "--max_src_len", 200,
              "--gradient_accumulation_steps", 1, "--max_steps", 2, "--train_type", "all", "--show_loss_step", 1,
              "--model_name_or_path", path, *same_training.linear_steps(ROOT / "ds_zero3_offload.json", tmp_path)]
    one = run_train(monkeypatch, *common, "--per_device_train_batch_size", 2, "--output_dir", tmp_path / "one")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                             str(free_port()), str(ROOT / "train.py"), *map(str, common),
                             "--per_device_train_batch_size", "1", "--output_dir", str(tmp_path / "two")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Glm4MoeMoE are leaf modules" in result.stdout + result.stderr

    def losses(out):
        with open(os.path.join(out, "train_log.jsonl")) as f:
            return [record["loss"] for record in map(json.loads, f) if "loss" in record]
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)
    two = load_file(os.path.join(tmp_path / "two", os.path.basename(one), "model.safetensors"))
    reference = load_file(os.path.join(one, "model.safetensors"))
    start = {name: w for name, w in load_file(os.path.join(path, "model.safetensors")).items() if name in reference}
    # each gradient sums over at most 2 samples x 256 tokens a step, 2 steps
    same_training.assert_same_updates(two, reference, start, summed_terms=2 * 2 * 256)
