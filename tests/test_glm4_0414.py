"""GLM-4-0414 / GLM-Z1 (mode glm4-0414) on transformers' own Glm4ForCausalLM.

External rules followed here:
- the chat template is GLM-Z1-0414's `chat_template` (model/templates/glm_z1_0414.jinja; origin in
  model/templates/PROVENANCE.md), rendered by transformers' `apply_chat_template`;
- labels as THUDM's GLM-4 finetune_demo labels the GLM-4 format (model/template.py's docstring): what follows an
  assistant's <|assistant|> token, the token after the turn, and <|user|> appended after the last answer.
"""
import json
import os
import sys
from itertools import count

import pytest

from conftest import ROOT, one_rank_env

PORTS = count(32100 + os.getpid() % 97)
MODE = "glm4-0414"
TOOLS = [{"type": "function", "function": {"name": "查询天气", "description": "查询城市的天气",
                                             "parameters": {"type": "object",
                                                            "properties": {"城市": {"type": "string"}}}}}]
BATTERY = [
    [{"role": "user", "content": "发动机水温高怎么办？"}, {"role": "assistant", "content": "检查冷却液。"}],
    [{"role": "system", "content": "You are a mechanic."}, {"role": "user", "content": "Engine hot?"},
     {"role": "assistant", "content": "Check the fan."}, {"role": "user", "content": "还有呢？"},
     {"role": "assistant", "content": "看看水泵。"}],
    [{"role": "system", "content": "", "tools": TOOLS}, {"role": "user", "content": "北京和上海天气？"},
     {"role": "assistant", "metadata": "查询天气", "content": '{"城市": "北京"}'},
     {"role": "assistant", "metadata": "查询天气", "content": '{"城市": "上海"}'},
     {"role": "observation", "content": '{"天气": "晴"}'}, {"role": "observation", "content": '{"天气": "雨"}'},
     {"role": "assistant", "content": "北京晴，上海雨。"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}],
    [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2", "reasoning_content": "一加一"},
     {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>二加二</think>4"}],
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from model.glm4_0414 import write_tiny_checkpoint
    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("glm4_0414") / "tiny"))


@pytest.fixture(scope="module")
def tokenizer(tiny):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny)


def official_ids(tokenizer, messages, generation_prompt):
    """apply_chat_template(tokenize=True) of the official template on the conversation as the template takes it."""
    from model.chat_template import template_inputs
    converted, tools = template_inputs(messages)
    ids = tokenizer.apply_chat_template(converted, tools=tools, add_generation_prompt=generation_prompt,
                                        tokenize=True, return_dict=True)["input_ids"]
    return list(ids)


def test_tiny_checkpoint_loads_without_remote_code_in_the_shipped_layout(tiny, tokenizer):
    from transformers import AutoModelForCausalLM, Glm4ForCausalLM

    from model.glm4_0414 import read_template
    files = set(os.listdir(tiny))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    with open(os.path.join(tiny, "tokenizer_config.json"), encoding="utf-8") as f:
        assert json.load(f)["chat_template"] == read_template()
    assert isinstance(AutoModelForCausalLM.from_pretrained(tiny), Glm4ForCausalLM)
    for token in ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>", "<think>",
                  "</think>"):
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1, token


@pytest.mark.parametrize("index", range(len(BATTERY)))
def test_training_ids_and_prompts_are_the_official_template(tokenizer, index):
    """Training ids without thinking in the final turn == apply_chat_template(tokenize=True) + the appended
    <|user|>; the prompt chat() builds == apply_chat_template(add_generation_prompt=True); the learned tokens are
    exactly the assistant turns (after each <|assistant|>) and the token after each."""
    from model import template
    messages = BATTERY[index]
    ids, labels, answer_start = template.encode_messages(tokenizer, MODE, messages)
    user = tokenizer.convert_tokens_to_ids("<|user|>")
    assistant = tokenizer.convert_tokens_to_ids("<|assistant|>")
    if "</think>" not in messages[-1]["content"]:
        assert ids == official_ids(tokenizer, messages, False) + [user]
    prompt = template.encode_context(tokenizer, MODE, messages[:-1])
    assert prompt == official_ids(tokenizer, messages[:-1], True)
    # learned: from after each <|assistant|> up to and including the next role token / the appended <|user|>
    expected, inside = [], False
    for position, token in enumerate(ids):
        role = token in {assistant, user, tokenizer.convert_tokens_to_ids("<|observation|>")}
        expected.append(inside)
        if role:
            inside = token == assistant
    if "</think>" in messages[-1]["content"]:  # the final turn starts after the generation prompt's <think>
        think = ids.index(tokenizer.convert_tokens_to_ids("<think>"), answer_start - 1)
        expected[answer_start - 2:think + 1] = [False] * (think + 3 - answer_start)
    assert [label != -100 for label in labels] == expected
    assert all(label in (-100, token) for label, token in zip(labels, ids))


def test_z1_thinking_labels_token_by_token(tokenizer):
    """GLM-Z1: the history turn's thinking is removed as the template renders history; the final turn is the
    generation prompt <|assistant|>\\n<think> then thinking</think>answer; --thinking mask learns only the answer."""
    from model import template
    messages = BATTERY[4]
    pieces = lambda ids: [tokenizer.decode(ids)]  # noqa: E731  (one decode: byte-level pieces of a character)
    for thinking, learned_final in (("learn", "二加二</think>4<|user|>"), ("mask", "4<|user|>")):
        ids, labels, start = template.encode_messages(tokenizer, MODE, messages, thinking=thinking)
        assert "".join(pieces(ids)) == ("[gMASK]<sop><|user|>\n1+1?<|assistant|>\n2<|user|>\n2+2?"
                                        "<|assistant|>\n<think>二加二</think>4<|user|>")
        learned = "".join(pieces([i for i, label in zip(ids, labels) if label != -100]))
        assert learned == "\n2<|user|>" + learned_final
        assert "".join(pieces(ids[start:])) == "二加二</think>4<|user|>"
    # without thinking the final turn trains as the template renders a non-thinking turn
    plain = messages[:3] + [{"role": "assistant", "content": "4"}]
    ids, labels, _ = template.encode_messages(tokenizer, MODE, plain)
    assert "".join(pieces(ids)).endswith("2+2?<|assistant|>\n4<|user|>")


def test_thinking_flag_reaches_the_training_data(tiny, tokenizer, tmp_path):
    """train.py --thinking: a `messages` sample with reasoning_content learns thinking + answer (learn) or the
    answer only (mask), through train.py's own data path."""
    import train
    data = tmp_path / "z1.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "2+2?"},
                                             {"role": "assistant", "reasoning_content": "二加二", "content": "4"}]},
                               ensure_ascii=False) + "\n", encoding="utf-8")
    learned = {}
    for thinking in ("learn", "mask"):
        args = train.parse_args([str(a) for a in train_args(tiny, tmp_path / "out", "--train_path", data,
                                                            "--thinking", thinking)])
        example = train.build_data(args, tokenizer)[0].examples[0]
        learned[thinking] = tokenizer.decode([i for i in example["labels"] if i != -100])
    assert learned == {"learn": "二加二</think>4<|user|>", "mask": "4<|user|>"}


def test_generated_thinking_is_shown_apart_and_not_scored():
    from model import template
    content, history = template.process_response(MODE, "想一想</think>\n\n答案是4")
    assert content == "答案是4" and history[-1]["reasoning_content"] == "想一想"
    call, _ = template.process_response(MODE, "查询天气\n{\"城市\": \"北京\"}")
    assert call["name"] == "查询天气" and call["parameters"] == {"城市": "北京"}


def test_web_demo_shows_the_thinking_collapsed_apart_from_the_answer():
    import web_demo
    from model import template
    _, history = template.process_response(MODE, "想一想</think>答案")
    shown = web_demo.shown([{"role": "user", "content": "q"}] + history, MODE)
    assert shown[1] == {"role": "assistant", "content": "想一想",
                        "metadata": {"title": web_demo.THINKING_TITLE, "status": "done"}}
    assert shown[2] == {"role": "assistant", "content": "答案"}


def run_train(monkeypatch, *argv):
    import train
    one_rank_env(monkeypatch, next(PORTS))
    return train.main([str(a) for a in argv])


def train_args(tiny, out, *extra):
    return ["--model_name_or_path", tiny, "--train_path", ROOT / "data/train.jsonl", "--max_len", 256,
            "--max_src_len", 200, "--per_device_train_batch_size", 2, "--gradient_accumulation_steps", 1,
            "--max_steps", 2, "--learning_rate", 1e-2, "--output_dir", out, *extra]


def test_lora_detected_mode_merge_equals_base_plus_adapter(tiny, tmp_path, monkeypatch, one_thread, capsys):
    """--mode left out: one line names glm4-0414; LoRA on the 0414 module names by default; merge_lora.py's output
    is Glm4ForCausalLM that AutoModelForCausalLM loads, equal to base + adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import merge_lora
    saved = run_train(monkeypatch, *train_args(tiny, tmp_path / "out"))
    assert "using --mode glm4-0414" in capsys.readouterr().out
    with open(os.path.join(saved, "adapter_config.json")) as f:
        assert set(json.load(f)["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj",
                                                       "down_proj"}
    merged = tmp_path / "merged"
    merge_lora.main(["--ori_model_dir", tiny, "--model_dir", saved, "--output_dir", str(merged)])
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny), saved)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(merged)(ids).logits
    assert type(AutoModelForCausalLM.from_pretrained(merged)).__name__ == "Glm4ForCausalLM"
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)  # fp32 rounding of W + scale * B @ A


@pytest.mark.parametrize("train_type,extra", [("freeze", []), ("all", []), ("lora", ["--quantization_bit", 4])])
def test_other_train_types_train_and_save_loadable(tiny, tmp_path, monkeypatch, one_thread, train_type, extra):
    """freeze (last layers by default), all, QLoRA 4-bit train through train.main and load for chat()."""
    from transformers import Glm4ForCausalLM

    from inference import load_for_inference
    saved = run_train(monkeypatch, *train_args(tiny, tmp_path / "out", "--mode", MODE, "--train_type", train_type,
                                               "--max_steps", 1, *extra))
    model, tokenizer = load_for_inference(MODE, saved)
    assert isinstance(model.base_model.model if train_type == "lora" else model, Glm4ForCausalLM)
    response, history = model.chat(tokenizer, "发动机", max_new_tokens=3, do_sample=False)  # predict.py / web_demo
    assert isinstance(response, (str, dict, list)) and history[0] == {"role": "user", "content": "发动机"}


@pytest.mark.parametrize("flags,named", [(["--train_type", "ptuning"], "--train_type ptuning"),
                                         (["--packing"], "--packing"),
                                         (["--sequence_parallel_size", 2], "--sequence_parallel_size")])
def test_unsupported_flags_refused_in_one_line(tiny, tmp_path, capsys, flags, named):
    import train
    with pytest.raises(SystemExit):
        train.parse_args([str(a) for a in train_args(tiny, tmp_path / "out", "--mode", MODE, *flags)])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert named in error and MODE in error


def test_unknown_model_directory_stops_in_one_line(tmp_path, capsys):
    import predict
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(SystemExit):
        predict.parse_args(["--model_path", str(tmp_path), "--query", "hi"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "llama" in error and "--mode" in error
    assert sys.modules["predict"]  # the entry point's own parser refused it
