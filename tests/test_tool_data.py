"""Tool-call training data (issue 20 "Data", issue 19 point 7) through train.py's data path: the example set's calls and
observations are labelled as THUDM's official formats teach; the forms the official demos write are converted; bad
calls stop train.main in one line naming file:line; an empty answer learns its end.

Official sources (read through GitHub mirrors; nothing of them is copied here):
- GLM-4: glm-4-9b-chat's tokenizer_config.json `chat_template` (a message renders `<|role|>{metadata}\\n{content}`, a
  message with empty content is left out) and THUDM/GLM-4 finetune_demo/finetune.py `process_batch` (each message
  rendered alone, the loss mask of system/user/observation off and of assistant on, shifted by one: an assistant
  message learns everything after its <|assistant|> and the next role token; <|user|> (151336) appended at the end).
  Parallel calls: GLM-4 basic_demo openai_api_server `process_messages` turns an OpenAI `tool_calls` list into one
  assistant message per call (metadata = name, content = arguments) and each `tool` result into an observation.
- ChatGLM3: finetune_chatmodel_demo/preprocess_utils.py `format_conversation` (a `tool` item becomes an assistant
  message with the tool name as metadata and "```python\\ntool_call(k=v)\\n```" as content, learned, then an
  observation, not learned; `build_single_message` encodes "{metadata}\\n" and the content apart; labels shifted by
  one, eos at the end) and chatglm3-6b PROMPT.md (the same call form).
"""
import json
import re

import pytest

from conftest import ROOT
from model import MODE, template
import dataset
import tool_data
import train
from test_data_input import jsonl, train_error
from test_train import train_in_process  # noqa: F401 (a fixture)
from test_truncation import build, learned_runs, role

EXAMPLE_TRAIN = ROOT / "data/tools_train.jsonl"
EXAMPLE_TEST = ROOT / "data/tools_test.jsonl"
SAMPLES = [json.loads(line) for line in EXAMPLE_TRAIN.read_text(encoding="utf-8").splitlines()]
TOOLS = {t["function"]["name"]: t for s in SAMPLES for t in s["conversations"][0]["tools"]}
ROLE_TOKEN = {"user": "<|user|>", "assistant": "<|assistant|>", "observation": "<|observation|>",
              "system": "<|system|>"}


def example_set(mode, tokenizer):
    return build(mode, tokenizer, EXAMPLE_TRAIN, 2048, 1984)


# ------------------------------------------------------------------------------------------------------------------
# the example set, labelled as the official formats teach
# ------------------------------------------------------------------------------------------------------------------
# glm4, written out: the learned text of samples of each kind, run by run (a run: consecutive labelled tokens)
GLM4_LEARNED = {
    0: ['read_fault_codes\n{"system": "变速箱"}<|observation|>',  # a single call, then its answer
        "\n变速箱读到 1 个故障码：P0700（变速箱控制系统故障）。建议先从变速箱电磁阀故障查起。<|user|>"],
    3: ['read_fault_codes\n{"system": "ABS"}<|assistant|>read_fault_codes\n{"system": "变速箱"}<|observation|>',
        "\n读取结果：ABS：C0035；变速箱：P0700。<|user|>"],  # two calls in parallel, two observations (not learned)
    4: ['lookup_fault_code\n{"code": "P0301"}<|assistant|>get_vehicle_info\n{}<|observation|>',  # one without arguments
        "\n这是一台 2018 年的大众 朗逸，里程 88000 公里。P0301 表示1 缸失火，常见原因：点火线圈损坏、火花塞老化、喷油嘴堵塞。<|user|>"],
    5: ['read_fault_codes\n{"system": "空调"}<|observation|>',  # call -> observation, three steps, then the answer
        'lookup_fault_code\n{"code": "B1422"}<|observation|>',
        'estimate_repair_cost\n{"part": "空调压力传感器", "labor_hours": 0.8}<|observation|>',
        "\n空调有故障码 B1422（空调压力传感器电路故障），最可能是压力传感器损坏。更换空调压力传感器约需 400 元（零件 240 元，工时费 160 元）。<|user|>"],
    8: ["\n先更换空调滤芯，再用蒸发箱清洗剂清洗，平时熄火前几分钟关闭压缩机吹干蒸发箱。<|user|>"],  # no tool needed
    10: ["\n以车门框或油箱盖上的标签为准，一般家用轿车在 2.2 到 2.5 bar 之间。<|user|>",  # a text turn, then a call
         'read_fault_codes\n{"system": "发动机"}<|observation|>',
         "\n发动机读到 2 个故障码：P0171（系统过稀（第 1 列））；P0420（三元催化器效率低于阈值）。建议先从进气管漏气查起。<|user|>"],
}


def glm4_rule(conversation) -> list[str]:
    """GLM-4's finetune_demo rule on the template's text: an assistant message learns "{metadata}\\n{content}" and the
    role token after it (<|user|> after the last); consecutive learned pieces make one run."""
    runs, run = [], ""
    for index, message in enumerate(conversation):
        if message["role"] != "assistant":
            if run:
                runs.append(run)
                run = ""
            continue
        after = conversation[index + 1]["role"] if index + 1 < len(conversation) else "user"
        run += f"{message.get('metadata', '')}\n{message['content']}{ROLE_TOKEN[after]}"
    return runs + ([run] if run else [])


def test_glm4_example_set_learns_every_call_and_no_observation(tiny_dirs):
    tokenizer = MODE["glm4"].tokenizer.from_pretrained(tiny_dirs["glm4"])
    data = example_set("glm4", tokenizer)
    assert (len(data), data.stats.truncated, data.stats.unfit) == (len(SAMPLES), 0, 0)
    for index, expected in GLM4_LEARNED.items():
        assert [tokenizer.decode(run) for run in learned_runs(tokenizer, data[index])] == expected, index
    calls = observations = 0
    for sample, example in zip(SAMPLES, data.examples):
        conversation = sample["conversations"]
        learned = [tokenizer.decode(run) for run in learned_runs(tokenizer, example)]
        assert learned == glm4_rule(conversation)
        for message in conversation:  # an observation's text is context: never inside a learned run
            if message["role"] == "observation":
                observations += 1
                assert not any(message["content"] in run for run in learned)
            calls += bool(message.get("metadata"))
    assert calls >= 50 and observations == calls  # every call is answered


def test_glm3_example_set_writes_calls_as_chatglm3_does_and_learns_them(tiny_dirs):
    tokenizer = MODE["glm3"].tokenizer.from_pretrained(tiny_dirs["glm3"])
    data = example_set("glm3", tokenizer)
    assert len(data) == len(SAMPLES)
    converted = dataset.sample_to_messages("glm3", SAMPLES[5], "t")
    assert [(m.get("metadata"), m["content"]) for m in converted if m.get("metadata")] == [
        ("read_fault_codes", "```python\ntool_call(system='空调')\n```"),
        ("lookup_fault_code", "```python\ntool_call(code='B1422')\n```"),
        ("estimate_repair_cost", "```python\ntool_call(part='空调压力传感器', labor_hours=0.8)\n```")]
    assert [m["content"] for m in dataset.sample_to_messages("glm3", SAMPLES[4], "t") if m.get("metadata")] == [
        "```python\ntool_call(code='P0301')\n```", "```python\ntool_call()\n```"]
    for sample, example in zip(SAMPLES, data.examples):
        messages = dataset.sample_to_messages("glm3", sample, "t")
        expected, run = [], []  # ChatGLM3's rule, on ids: "{metadata}\n" and the content encoded apart
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                if run:
                    expected.append(run)
                    run = []
                continue
            after = role(tokenizer, messages[index + 1]["role"]) if index + 1 < len(messages) else \
                tokenizer.eos_token_id
            run += tokenizer.encode_text(f"{message.get('metadata', '')}\n") + \
                tokenizer.encode_text(message["content"]) + [after]
        assert learned_runs(tokenizer, example) == expected + ([run] if run else [])


def test_the_example_set_is_what_make_tools_writes(tmp_path, monkeypatch):
    import runpy
    script = runpy.run_path(str(ROOT / "data/make_tools.py"))
    monkeypatch.setitem(script["main"].__globals__, "HERE", tmp_path)
    script["main"]()
    for path in (EXAMPLE_TRAIN, EXAMPLE_TEST):
        assert (tmp_path / path.name).read_text(encoding="utf-8") == path.read_text(encoding="utf-8")
    test = [json.loads(line) for line in EXAMPLE_TEST.read_text(encoding="utf-8").splitlines()]
    assert 45 <= len(SAMPLES) + len(test) <= 60 and len(TOOLS) == 6
    kinds = {"parallel": 0, "multi-step": 0, "no tool": 0, "multi-turn": 0}
    for sample in SAMPLES + test:
        roles = [m["role"] + ("-call" if m.get("metadata") else "") for m in sample["conversations"]]
        kinds["parallel"] += "assistant-call,assistant-call" in ",".join(roles)
        kinds["multi-step"] += roles.count("observation") >= 2 and "assistant-call,assistant-call" not in ",".join(roles)
        kinds["no tool"] += "observation" not in roles
        kinds["multi-turn"] += roles.count("user") >= 2
        assert 3 <= len(sample["conversations"][0]["tools"]) <= 6
    assert all(count >= 4 for count in kinds.values()), kinds


def demo_tools_data_flags() -> list[str]:
    """The data flags demo.sh passes to train.py for TASK=tools."""
    lines = (ROOT / "demo.sh").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("tools)"))
    line = next(line for line in lines[start:] if line.strip().startswith("DATA=("))
    return line.strip()[len("DATA=("):-1].split()


def test_train_main_accepts_the_example_set_with_the_demos_flags(tiny_dirs, tmp_path, train_in_process, caplog):
    """What `MODE=glm4 TASK=tools bash demo.sh` trains on, with its data flags, one step in this process: every
    sample fits (none truncated or skipped)."""
    flags = demo_tools_data_flags()
    assert flags[:4] == ["--train_path", "data/tools_train.jsonl", "--dev_path", "data/tools_test.jsonl"]
    out = tmp_path / "out"
    with caplog.at_level("INFO", logger="chatglm"):
        train_in_process("--mode", "glm4", "--model_name_or_path", tiny_dirs["glm4"], "--output_dir", out,
                         "--train_type", "lora", "--lora_module_name", "query_key_value",
                         *(str(ROOT / f) if f.startswith("data/") else f for f in flags),
                         "--per_device_train_batch_size", 1, "--max_steps", 1, "--show_loss_step", 1)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in log if "loss" in record] == [1]
    assert f"{EXAMPLE_TRAIN}: 42 samples, 0 truncated" in caplog.text
    assert f"{EXAMPLE_TEST}: 10 samples, 0 truncated" in caplog.text


@pytest.mark.parametrize("env,message", [
    ({"MODE": "glm2", "TASK": "tools"}, "demo.sh: TASK=tools needs MODE=glm3, glm4 or glm4-0414"),
    ({"TASK": "nope"}, "demo.sh: TASK=nope is not one of chat, tools"),
])
def test_demo_refuses_a_task_it_cannot_run(env, message, tmp_path):
    import os
    import subprocess
    result = subprocess.run(["bash", str(ROOT / "demo.sh")], env={**os.environ, **env, "WORK": str(tmp_path / "w")},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.startswith(message) and not (tmp_path / "w").exists()


# ------------------------------------------------------------------------------------------------------------------
# the forms the official demos write, converted
# ------------------------------------------------------------------------------------------------------------------
SYSTEM = {"role": "system", "content": "", "tools": [TOOLS["read_fault_codes"], TOOLS["get_vehicle_info"]]}
ASK = {"role": "user", "content": "读一下发动机和变速箱的故障码，再看看车辆信息。"}
RESULTS = [{"role": "observation", "content": "{\"codes\": [\"P0301\"]}"},
           {"role": "observation", "content": "{\"codes\": []}"},
           {"role": "observation", "content": "{\"model\": \"大众 朗逸\"}"}]
DONE = {"role": "assistant", "content": "发动机有 P0301，变速箱正常。"}
CANONICAL = [SYSTEM, ASK,
             {"role": "assistant", "metadata": "read_fault_codes", "content": "{\"system\": \"发动机\"}"},
             {"role": "assistant", "metadata": "read_fault_codes", "content": "{\"system\": \"变速箱\"}"},
             {"role": "assistant", "metadata": "get_vehicle_info", "content": "{}"}, *RESULTS, DONE]


def openai_call(name, arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


FORMS = {
    # arguments as JSON objects, and no arguments as "" (GLM-4 writes them with json.dumps, ensure_ascii=False)
    "objects": {"conversations": [SYSTEM, ASK,
                                  {"role": "assistant", "metadata": "read_fault_codes", "content": {"system": "发动机"}},
                                  {"role": "assistant", "metadata": "read_fault_codes", "content": {"system": "变速箱"}},
                                  {"role": "assistant", "metadata": "get_vehicle_info", "content": ""},
                                  *RESULTS, DONE]},
    # OpenAI's tool_calls and tool results, as GLM-4's openai_api_server takes them, under GLM-4 finetune's "messages"
    "openai": {"messages": [SYSTEM, ASK,
                            {"role": "assistant", "content": None, "tool_calls": [
                                openai_call("read_fault_codes", "{\"system\": \"发动机\"}"),
                                openai_call("read_fault_codes", {"system": "变速箱"}),
                                openai_call("get_vehicle_info", "{}")]},
                            *({"role": "tool", "tool_call_id": f"call_{i}", "content": r["content"]}
                              for i, r in enumerate(RESULTS)), DONE]},
}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_official_forms_of_parallel_calls_become_consecutive_calls_and_observations(form, tiny_dirs, tmp_path):
    assert dataset.sample_to_messages("glm4", FORMS[form], "t", check_tools=True) == CANONICAL
    tokenizer = MODE["glm4"].tokenizer.from_pretrained(tiny_dirs["glm4"])
    path = tmp_path / "forms.jsonl"
    path.write_text(jsonl(FORMS[form], {"conversations": CANONICAL}), encoding="utf-8")
    data = build("glm4", tokenizer, path, 2048, 1984)
    assert data[0] == data[1]
    assert [tokenizer.decode(run) for run in learned_runs(tokenizer, data[0])] == [
        'read_fault_codes\n{"system": "发动机"}<|assistant|>read_fault_codes\n{"system": "变速箱"}<|assistant|>'
        'get_vehicle_info\n{}<|observation|>', "\n发动机有 P0301，变速箱正常。<|user|>"]


def test_chatglm3_finetune_demo_tool_items_become_a_call_and_its_observation(tiny_dirs):
    """ChatGLM3's finetune demo: tools beside the conversation, {"role": "tool", "name", "parameters",
    "observation"} items (a non-string observation is written with json.dumps)."""
    sample = {"tools": SYSTEM["tools"], "conversations": [
        ASK, {"role": "assistant", "content": "好的，我先读故障码。"},
        {"role": "tool", "name": "read_fault_codes", "parameters": {"system": "发动机"}, "observation": {"codes": ["P0301"]}},
        {"role": "tool", "name": "get_vehicle_info", "parameters": {}, "observation": "{\"model\": \"大众 朗逸\"}"},
        DONE]}
    assert dataset.sample_to_messages("glm3", sample, "t", check_tools=True) == [
        {"role": "system", "content": tool_data.GLM3_TOOL_SYSTEM_TEXT, "tools": SYSTEM["tools"]}, ASK,
        {"role": "assistant", "content": "好的，我先读故障码。"},
        {"role": "assistant", "metadata": "read_fault_codes", "content": "```python\ntool_call(system='发动机')\n```"},
        {"role": "observation", "content": "{\"codes\": [\"P0301\"]}"},
        {"role": "assistant", "metadata": "get_vehicle_info", "content": "```python\ntool_call()\n```"},
        {"role": "observation", "content": "{\"model\": \"大众 朗逸\"}"}, DONE]
    # as ChatGLM3's demo renders it: its tool system text, then the tools as JSON (indent 4, non-ASCII kept)
    tokenizer = MODE["glm3"].tokenizer.from_pretrained(tiny_dirs["glm3"])
    system_text = tool_data.GLM3_TOOL_SYSTEM_TEXT + "\n" + json.dumps(SYSTEM["tools"], indent=4, ensure_ascii=False)
    ids = template.encode_context(tokenizer, "glm3", dataset.sample_to_messages("glm3", sample, "t")[:2])
    expected = [template.special(tokenizer, "[gMASK]"), template.special(tokenizer, "sop"), role(tokenizer, "system"),
                *tokenizer.encode_text("\n"), *tokenizer.encode_text(system_text), role(tokenizer, "user")]
    assert ids[:len(expected)] == expected
    assert tool_data.glm3_call_arguments("```python\ntool_call(part='空调压力传感器', labor_hours=0.8)\n```") == \
        {"part": "空调压力传感器", "labor_hours": 0.8}


def test_glm4_finetune_readme_calls_become_calls_the_model_writes():
    """GLM-4's finetune_demo README writes a call as assistant text {"name", "arguments"}; GLM-4-9B-Chat writes
    `<|assistant|>name\\n{arguments}` (what its chat() and openai_api_server parse), so the sample teaches that."""
    readme = {"role": "assistant", "content": json.dumps({"name": "read_fault_codes", "arguments": {"system": "发动机"}},
                                                         ensure_ascii=False)}
    sample = {"messages": [SYSTEM, ASK, readme, RESULTS[0], DONE]}
    assert dataset.sample_to_messages("glm4", sample, "t", check_tools=True)[2] == \
        {"role": "assistant", "metadata": "read_fault_codes", "content": "{\"system\": \"发动机\"}"}
    undeclared = {"messages": [ASK, readme]}  # not a declared tool: the text stays text
    assert dataset.sample_to_messages("glm4", undeclared, "t", check_tools=True)[1] == readme


# ------------------------------------------------------------------------------------------------------------------
# refused in one line, file:line
# ------------------------------------------------------------------------------------------------------------------
def call(name, content):
    return {"role": "assistant", "metadata": name, "content": content}


REFUSED = [
    ([SYSTEM, ASK, call("read_fault_codes", "{system: 发动机}"), RESULTS[0], DONE],
     "turn 3: the arguments of the call to 'read_fault_codes' are not valid JSON (Expecting property name enclosed "
     "in double quotes at column 2): '{system: 发动机}'"),
    ([SYSTEM, ASK, call("read_fault_codes", "[\"发动机\"]"), RESULTS[0], DONE],
     "turn 3: the arguments of the call to 'read_fault_codes' must be a JSON object, got '[\"发动机\"]'"),
    ([SYSTEM, ASK, call("read_live_data", "{\"sensor\": \"进气压力\"}"), RESULTS[0], DONE],
     "turn 3 calls the tool 'read_live_data', which the sample does not declare (its system messages' 'tools' "
     "declare: get_vehicle_info, read_fault_codes)"),
    ([ASK, call("read_fault_codes", "{\"system\": \"发动机\"}"), RESULTS[0], DONE],
     "turn 2 calls the tool 'read_fault_codes', which the sample does not declare (its system messages' 'tools' "
     "declare: none)"),
    ([SYSTEM, ASK, {"role": "assistant", "content": "我来查一下。"}, RESULTS[0], DONE],
     "turn 4 is an observation without a tool call to answer (each observation answers one call of the assistant "
     "turns before it, in order)"),
    ([SYSTEM, ASK, call("read_fault_codes", "{\"system\": \"发动机\"}"), RESULTS[0], RESULTS[1], DONE],
     "turn 5 is an observation without a tool call to answer (each observation answers one call of the assistant "
     "turns before it, in order)"),
]


@pytest.mark.parametrize("mode", ["glm3", "glm4"])
@pytest.mark.parametrize("conversation,reason", REFUSED)
def test_bad_calls_stop_train_main_in_one_line(mode, conversation, reason, tiny_dirs, tmp_path, train_in_process):
    path = tmp_path / "bad.jsonl"
    path.write_text(jsonl({"conversations": CANONICAL}, {"conversations": conversation}), encoding="utf-8")
    assert train_error(train_in_process, tiny_dirs, tmp_path, path, mode) == f"{path}:2: {reason}"


# ------------------------------------------------------------------------------------------------------------------
# issue 19 point 7: an empty answer learns its end
# ------------------------------------------------------------------------------------------------------------------
def test_glm4_empty_answers_learn_what_ends_them(tiny_dirs, tmp_path):
    """GLM-4's template leaves an empty message out, so the finetune_demo learns nothing from it (and a window of
    such samples divides 0 by 0); in chat the model must still answer the prompt's <|assistant|>, with "\\n" and a
    stop token, which the chat() of glm-4-9b-chat(-1m) returns as "" (it strips the text). That is what it learns.
    A call without arguments writes them as {} (what the model writes, and what process_response can parse)."""
    tokenizer = MODE["glm4"].tokenizer.from_pretrained(tiny_dirs["glm4"])
    samples = [{"instruction": "你好", "output": ""},
               {"conversations": [ASK, {"role": "assistant", "content": ""}]},
               {"conversations": [SYSTEM, ASK, call("get_vehicle_info", ""), RESULTS[2], DONE]}]
    path = tmp_path / "empty.jsonl"
    path.write_text(jsonl(*samples), encoding="utf-8")
    data = build("glm4", tokenizer, path, 2048, 1984)
    assert [[tokenizer.decode(run) for run in learned_runs(tokenizer, example)] for example in data.examples] == [
        ["\n<|user|>"], ["\n<|user|>"], ["get_vehicle_info\n{}<|observation|>", "\n发动机有 P0301，变速箱正常。<|user|>"]]
    # the prompt is the one chat() builds: the empty answer adds only what the model generates
    ids, labels, start = template.encode_messages(tokenizer, "glm4", [ASK, {"role": "assistant", "content": ""}])
    assert ids[:start] == template.encode_prompt(tokenizer, "glm4", ASK["content"])
    assert ids[start:] == tokenizer.encode_text("\n") + [role(tokenizer, "user")]


@pytest.mark.parametrize("mode", ["glm3", "glm4"])
def test_the_docs_example_trains_as_the_docs_say(mode, tiny_dirs, tmp_path):
    section = (ROOT / "docs/tools.md").read_text(encoding="utf-8")
    sample = json.loads(section[section.index("```json\n") + 8:section.index("\n```", section.index("```json"))])
    path = tmp_path / "example.jsonl"
    path.write_text(jsonl(sample), encoding="utf-8")
    tokenizer = MODE[mode].tokenizer.from_pretrained(tiny_dirs[mode])
    runs = learned_runs(tokenizer, build(mode, tokenizer, path, 2048, 1984)[0])
    if mode == "glm4":
        assert tokenizer.decode(runs[0]) == (
            'read_fault_codes\n{"system": "发动机"}<|assistant|>read_fault_codes\n{"system": "变速箱"}<|assistant|>'
            'get_vehicle_info\n{}<|observation|>')
    else:
        assert [m["content"] for m in dataset.sample_to_messages(mode, sample, "t") if m.get("metadata")] == [
            "```python\ntool_call(system='发动机')\n```", "```python\ntool_call(system='变速箱')\n```",
            "```python\ntool_call()\n```"]
    assert len(runs) == 2


def test_glm3_calls_must_be_tool_calls_chat_can_read():
    """glm3 writes calls as ChatGLM3's tool_call(key=value) (chatglm3-6b's process_response evaluates it, defining
    only tool_call): an argument named like a Python keyword cannot be written so (tool_call(class=...) is a syntax
    error), and a call given in that form with another function name is refused; what the data writes is what
    chat() reads back (template.call_arguments)."""
    declared = {"role": "system", "content": "", "tools": [{"type": "function", "function": {"name": "lookup"}}]}
    for content, reason in (({"class": "SUV"}, "'class', which ChatGLM3's tool_call(key=value) form cannot write"),
                            ("```python\nprint(x=1)\n```", "is not ChatGLM3's tool_call(key=value, ...)")):
        with pytest.raises(tool_data.ToolDataError, match=re.escape(reason)):
            tool_data.conversation_messages("glm3", {"conversations": [declared, ASK, call("lookup", content)]},
                                            check=True)
    written = tool_data.conversation_messages(
        "glm3", {"conversations": [declared, ASK, call("lookup", {"model": "朗逸", "year": 2019, "ev": False})]},
        check=True)[-1]["content"]
    assert written == "```python\ntool_call(model='朗逸', year=2019, ev=False)\n```"
    assert template.call_arguments("glm3", written) == {"model": "朗逸", "year": 2019, "ev": False}
