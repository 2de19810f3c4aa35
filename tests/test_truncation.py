"""Truncation through train.py's data path (train.build_data -> InstructionDataset): old rounds go, then observations
and user text are shortened; system text, tools, tool calls and role tokens are never cut; a sample that still cannot
fit is skipped, counted and named in the log. Labels are checked token by token afterwards."""
import json
import logging

import pytest

from conftest import ROOT
from model import MODE, template
import dataset
import train
from test_data_input import jsonl, train_error
from test_train import train_in_process  # noqa: F401 (a fixture)

TOOLS = [json.loads(line) for line in (ROOT / "data/tools_train.jsonl").read_text(encoding="utf-8").splitlines()]
TOOLS = {t["function"]["name"]: t for sample in TOOLS for t in sample["conversations"][0]["tools"]}
SIX_TOOLS = [TOOLS[name] for name in ("read_fault_codes", "lookup_fault_code", "read_live_data", "get_vehicle_info",
                                      "estimate_repair_cost", "find_service_center")]
QUESTION = "我的车最近冷车启动困难，发动机故障灯亮了，怠速也有点抖，帮我读一下发动机的故障码。"
RESULT = json.dumps({"system": "发动机", "codes": ["P0301", "P0171"], "note": "读取完成，共两个故障码，数据来自发动机控制单元"},
                    ensure_ascii=False)
ANSWER = "读到 P0301 和 P0171，建议先检查点火线圈和进气管。"
CONVERSATION = [
    {"role": "system", "content": "你是汽车故障诊断助手。", "tools": SIX_TOOLS},
    {"role": "user", "content": "你好"},
    {"role": "assistant", "content": "你好！请问有什么可以帮你？"},
    {"role": "user", "content": QUESTION},
    {"role": "assistant", "metadata": "read_fault_codes", "content": "{\"system\": \"发动机\"}"},
    {"role": "observation", "content": RESULT},
    {"role": "assistant", "content": ANSWER},
]


def build(mode, tokenizer, path, max_len, max_src_len, *extra):
    args = train.parse_args(["--model_name_or_path", "-", "--mode", mode, "--train_path", str(path), "--output_dir",
                             "-", "--max_len", str(max_len), "--max_src_len", str(max_src_len), *extra])
    return train.build_data(args, tokenizer)[0]


def learned_runs(tokenizer, example) -> list[list[int]]:
    """The learned token ids, one list per run of consecutive labelled positions."""
    runs, run = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        assert label in (token, -100)
        if label != -100:
            run.append(token)
        elif run:
            runs.append(run)
            run = []
    return runs + ([run] if run else [])


def contains(ids, part) -> bool:
    return any(ids[i:i + len(part)] == part for i in range(len(ids) - len(part) + 1))


def role(tokenizer, name):
    return template.special(tokenizer, f"<|{name}|>")


@pytest.mark.parametrize("mode", ["glm3", "glm4"])
def test_truncation_drops_the_old_round_then_shortens_user_text_and_observations_only(mode, tiny_dirs, tmp_path):
    tokenizer = MODE[mode].tokenizer.from_pretrained(tiny_dirs[mode])
    messages = dataset.sample_to_messages(mode, {"conversations": CONVERSATION}, "t")
    system, call = messages[0], messages[4]
    # the least the rule can keep: system + tools, one character of the question and of the result, the call
    least = [system, {**messages[3], "content": "码"}, call, {**messages[5], "content": "}"}]
    max_src_len = len(template.encode_context(tokenizer, mode, least)) + 10
    assert len(template.encode_context(tokenizer, mode, [system] + messages[3:-1])) > max_src_len  # must shorten
    path = tmp_path / "long.jsonl"
    path.write_text(jsonl({"conversations": CONVERSATION}), encoding="utf-8")
    data = build(mode, tokenizer, path, max_src_len + 300, max_src_len)
    assert (len(data), data.stats.truncated, data.stats.unfit) == (1, 1, 0)

    kept, truncated = dataset.fit_prompt(tokenizer, mode, messages, max_src_len)
    assert truncated and [m["role"] for m in kept] == ["system", "user", "assistant", "observation", "assistant"]
    assert kept[0] == system and kept[2] == call and kept[4] == messages[6]  # system text, tools, call, answer whole
    # the result went first (to one character in glm4, whose template would drop an empty message; to nothing in
    # glm3, which keeps <|observation|>), then the question lost its start
    assert kept[3]["content"] == ("}" if mode == "glm4" else "")
    assert 1 <= len(kept[1]["content"]) < len(QUESTION) and QUESTION.endswith(kept[1]["content"])
    ids, labels, start = template.encode_messages(tokenizer, mode, kept)
    example = data[0]
    assert (example["input_ids"], example["labels"]) == (ids, labels) and start <= max_src_len

    # every role token is there: <|system|> (glm4: the tool prompt and the system text), user, call, observation,
    # answer; the tools are there in full
    prompt = ids[:start]
    counts = {name: prompt.count(role(tokenizer, name)) for name in ("system", "user", "assistant", "observation")}
    assert counts == {"system": 2 if mode == "glm4" else 1, "user": 1, "assistant": 2, "observation": 1}
    tools_text = template.glm4_tool_prompt(SIX_TOOLS) if mode == "glm4" else \
        json.dumps(SIX_TOOLS, indent=4, ensure_ascii=False)
    assert contains(prompt, tokenizer.encode_text(tools_text)[1:-1])

    # labels, token by token: the whole call and the role token after it, then the answer and its end
    if mode == "glm4":  # THUDM's GLM-4 finetune_demo: everything after <|assistant|>, and the next role token
        assert [tokenizer.decode(run) for run in learned_runs(tokenizer, example)] == [
            "read_fault_codes\n{\"system\": \"发动机\"}<|observation|>", f"\n{ANSWER}<|user|>"]
    else:  # ChatGLM3's finetune demo: "{metadata}\n" and the content encoded apart, then the next token
        call_text = "```python\ntool_call(system='发动机')\n```"
        assert learned_runs(tokenizer, example) == [
            tokenizer.encode_text("read_fault_codes\n") + tokenizer.encode_text(call_text)
            + [role(tokenizer, "observation")],
            tokenizer.encode_text("\n") + tokenizer.encode_text(ANSWER) + [tokenizer.eos_token_id]]


@pytest.mark.parametrize("mode", ["glm3", "glm4"])
def test_a_sample_that_cannot_fit_is_skipped_counted_and_named(mode, tiny_dirs, tmp_path, caplog, train_in_process):
    """Its tools alone are longer than --max_src_len: it is left out (today's code deleted the tools and kept the
    call), the others train; when none is left, train.main stops in one line."""
    tokenizer = MODE[mode].tokenizer.from_pretrained(tiny_dirs[mode])
    short = {"conversations": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]}
    messages = dataset.sample_to_messages(mode, {"conversations": CONVERSATION}, "t")
    tools_only = len(template.encode_context(tokenizer, mode, messages[:1] + [{"role": "user", "content": "x"}]))
    path = tmp_path / "mixed.jsonl"
    path.write_text(jsonl(short, {"conversations": CONVERSATION}, short, {"conversations": CONVERSATION}),
                    encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="chatglm"):
        data = build(mode, tokenizer, path, tools_only + 100, tools_only - 20)
    assert (len(data), data.stats.unfit, data.stats.truncated) == (2, 2, 0)
    assert all(role(tokenizer, "observation") not in example["input_ids"] for example in data.examples)
    warning = next(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert f"2 samples skipped" in warning and f"{path}:2, {path}:4" in warning

    only_long = tmp_path / "long.jsonl"
    only_long.write_text(jsonl({"conversations": CONVERSATION}), encoding="utf-8")
    message = train_error(train_in_process, tiny_dirs, tmp_path, only_long, mode)
    assert message.startswith(f"{only_long}: no usable sample (1 read, 0 skipped as truncated (--is_skip), 1 too "
                              f"long even after truncation")


@pytest.mark.parametrize("mode", ["glm2", "glm3", "glm4"])
def test_system_text_is_never_shortened(mode, tiny_dirs, tmp_path):
    """A system prompt is the instruction for the whole conversation: cutting its start would teach answers to an
    instruction nobody gave. Only user text is shortened; here that is not enough, so the sample is skipped."""
    tokenizer = MODE[mode].tokenizer.from_pretrained(tiny_dirs[mode])
    system = {"role": "system", "content": "你是汽车故障诊断助手，回答要简洁准确，先说结论再说原因，最后给出检查步骤。" * 3}
    sample = {"conversations": [system, {"role": "user", "content": "水温高怎么办？"},
                                {"role": "assistant", "content": "检查冷却液。"}]}
    with_system = len(template.encode_context(tokenizer, mode, [system, {"role": "user", "content": "？"}]))
    path = tmp_path / "system.jsonl"
    path.write_text(jsonl(sample, {"instruction": "你好", "output": "你好！"}), encoding="utf-8")
    data = build(mode, tokenizer, path, with_system + 40, with_system - 5)
    assert (len(data), data.stats.unfit) == (1, 1)
    assert template.encode_messages(tokenizer, mode, [{"role": "user", "content": "你好"},
                                                      {"role": "assistant", "content": "你好！"}])[0] == \
        data[0]["input_ids"]


def test_a_final_tool_call_too_long_for_max_len_is_skipped_not_cut(tiny_dirs, tmp_path):
    """An answer's text may be cut to fit --max_len (keeping its end token), a tool call may not: cut arguments are
    not JSON, and the sample would teach a broken call."""
    mode = "glm4"
    tokenizer = MODE[mode].tokenizer.from_pretrained(tiny_dirs[mode])
    tools = [TOOLS["estimate_repair_cost"]]
    arguments = json.dumps({"part": "空调压缩机总成及其电磁离合器、皮带轮和高低压管路", "labor_hours": 3.5}, ensure_ascii=False)
    call_sample = {"conversations": [{"role": "system", "content": "", "tools": tools},
                                     {"role": "user", "content": "估算一下费用。"},
                                     {"role": "assistant", "metadata": "estimate_repair_cost", "content": arguments}]}
    text_sample = {"conversations": [{"role": "system", "content": "", "tools": tools},
                                     {"role": "user", "content": "估算一下费用。"},
                                     {"role": "assistant", "content": f"费用估算：{arguments}，以上仅供参考。"}]}
    messages = dataset.sample_to_messages(mode, call_sample, "t")
    ids, _, start = template.encode_messages(tokenizer, mode, messages)
    path = tmp_path / "calls.jsonl"
    path.write_text(jsonl(call_sample, text_sample), encoding="utf-8")
    data = build(mode, tokenizer, path, len(ids) - 5, start)
    assert (len(data), data.stats.unfit, data.stats.truncated) == (1, 1, 1)
    example = data[0]  # the text answer: cut, ending with <|user|> learned
    assert len(example["input_ids"]) == len(ids) - 5 and example["labels"][-1] == role(tokenizer, "user")
