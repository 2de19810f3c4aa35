"""Tool-call metrics: metrics.tool_call_metrics on crafted chat() responses, and predict.py --test_path on
conversations with tools (every assistant turn predicted given the reference history before it), every number
computed by hand below."""
import json
from pathlib import Path

import pytest

import predict
import tool_data
from metrics import tool_call_metrics
from model import MODE, template
from model.template import call_arguments


def call(name, arguments):
    return {"name": name, "content": arguments}


# ------------------------------------------------------------------------------------------------------------------
# the metric functions on crafted predictions
# ------------------------------------------------------------------------------------------------------------------
TURNS = [  # (prediction, reference), each as chat() returns it
    # T1 same call, other spacing: decision, name, valid, exact; kv 1/1/1; set 1/1/1
    (call("read_fault_codes", '{ "system" : "发动机" }'), call("read_fault_codes", '{"system": "发动机"}')),
    # T2 right tool, one of two values wrong: name, valid, not exact; kv tp 1, pred 2, ref 2; set 0/1/1
    (call("read_fault_codes", '{"system": "变速箱", "mode": "full"}'),
     call("read_fault_codes", '{"system": "发动机", "mode": "full"}')),
    # T3 wrong tool, arguments not JSON: no name, invalid; kv 0/0/1; set 0/1/1
    (call("read_fault_codes", '{"system": '), call("check_tire", '{"wheel": "左前"}')),
    # T4 a call where text was due: wrong decision; one valid predicted call; set 0/1/0 (not a call turn)
    (call("read_fault_codes", '{"system": "发动机"}'), "你好"),
    # T5 text where a call was due: wrong decision, name missed; kv 0/0/1; set 0/0/1
    ("不知道", call("read_fault_codes", '{"x": 1}')),
    # T6 text for text: right decision, nothing else
    ("好的", "你好"),
    # T7 parallel, predicted in the other order plus one extra call: both reference calls paired exactly;
    #    kv tp 2, pred 3, ref 2; set 2/3/2; parallel 2/3/2
    ([call("read_fault_codes", '{"system": "变速箱"}'), call("read_fault_codes", '{"system": "发动机"}'),
      call("check_tire", '{"wheel": "左前"}')],
     [call("read_fault_codes", '{"system": "发动机"}'), call("read_fault_codes", '{"system": "变速箱"}')]),
    # T8 parallel, one of the two calls predicted: name 1, exact 1; kv 1/1/2; set 1/1/2; parallel 1/1/2
    ([call("read_fault_codes", '{"system": "发动机"}')],
     [call("read_fault_codes", '{"system": "发动机"}'), call("check_tire", '{"wheel": "左前"}')]),
]


def test_tool_call_metrics_hand_computed():
    predictions, references = zip(*TURNS)
    metrics = tool_call_metrics(list(predictions), list(references))
    assert metrics == {
        "turns": 8,
        "call_turns": 6,  # T1 T2 T3 T5 T7 T8
        "reference_calls": 8,  # 1 + 1 + 1 + 1 + 2 + 2
        "predicted_calls": 8,  # T1 T2 T3 T4: 1 each, T7: 3, T8: 1
        "call_decision_accuracy": 6 / 8,  # all but T4 and T5
        "call_name_accuracy": 5 / 8,  # T1 T2, T7 twice, T8 once
        "call_argument_validity": 7 / 8,  # all but T3's
        "call_argument_exact_match": 4 / 8,  # T1, T7 twice, T8 once
        "call_argument_f1": 2 * 5 / (7 + 9),  # tp 1+1+0+0+2+1; predicted 1+2+0+0+3+1; reference 1+2+1+1+2+2
        "call_set_precision": 4 / 8, "call_set_recall": 4 / 8, "call_set_f1": 2 * 4 / (8 + 8),
        "parallel_turns": 2, "parallel_call_precision": 3 / 4, "parallel_call_recall": 3 / 4,
    }


def test_pairing_ignores_the_order_of_parallel_calls():
    """The same two calls to one tool, swapped: a pairing in order would see two wrong arguments."""
    reference = [call("read_fault_codes", '{"system": "发动机", "level": 1}'),
                 call("read_fault_codes", '{"system": "变速箱", "level": 2}')]
    prediction = [call("read_fault_codes", '{"level": 2, "system": "变速箱"}'),
                  call("read_fault_codes", '{"level": 1, "system": "ABS"}')]
    metrics = tool_call_metrics([prediction], [reference])
    assert metrics["call_name_accuracy"] == 1.0
    assert metrics["call_argument_exact_match"] == 1 / 2  # 变速箱 paired with 变速箱, not with 发动机
    assert metrics["call_argument_f1"] == 2 * 3 / (4 + 4)  # system+level, then level
    assert metrics["parallel_call_precision"] == metrics["parallel_call_recall"] == 1 / 2


def test_argument_normalisation():
    """Equal means the same JSON value: key order and whitespace aside, types kept (1 is not 1.0 nor true); blank
    arguments are a call without arguments ({}); arguments that are JSON but not an object are not valid."""
    assert call_arguments("glm4", " ") == {} and call_arguments("glm4", "[1]") is None
    assert call_arguments("glm4", "{'a': 1}") is None
    cases = [('{"a": 1, "b": [1, 2]}', '{"b":[1,2],"a":1}', 1.0), ('{"a": 1}', '{"a": 1.0}', 0.0),
             ('{"a": 1}', '{"a": true}', 0.0), ("", "{}", 1.0), ('{"a": "x"}', '{"a": "x "}', 0.0)]
    for predicted, reference, expected in cases:
        metrics = tool_call_metrics([call("f", predicted)], [call("f", reference)])
        assert metrics["call_argument_exact_match"] == expected, (predicted, reference)
    assert tool_call_metrics([call("f", "[1]")], [call("f", "{}")])["call_argument_validity"] == 0.0


def glm3(name, **arguments):
    """A glm3 call as chat() returns it: the arguments in ChatGLM3's form (tool_data.glm3_call_text, as the data
    writes them; ChatGLM3's finetune demo format_function_call and chatglm3-6b's process_response)."""
    return call(name, tool_data.glm3_call_text(arguments))


def test_glm3_calls_are_read_in_chatglm3s_tool_call_form():
    """glm3 arguments are ChatGLM3's ```python\ntool_call(k=v)\n``` (read by template.call_arguments, the reading
    chat() uses), not JSON: a prediction identical to its reference scores 1 on every call metric."""
    turns = [(glm3("read_fault_codes", system="发动机"), glm3("read_fault_codes", system="发动机")),
             ([glm3("read_fault_codes", system="发动机"), glm3("get_vehicle_info")],
              [glm3("read_fault_codes", system="发动机"), glm3("get_vehicle_info")])]
    predictions, references = zip(*turns)
    metrics = tool_call_metrics(list(predictions), list(references), "glm3")
    for key, value in metrics.items():
        if key not in ("turns", "call_turns", "reference_calls", "predicted_calls", "parallel_turns"):
            assert value == 1.0, key
    # JSON-reading them instead (the glm4 reading) finds no valid argument at all
    assert tool_call_metrics(list(predictions), list(references), "glm4")["call_argument_validity"] == 0.0


def test_glm3_metrics_hand_computed():
    """The same rules as glm4 on ChatGLM3's form: spacing and keyword order aside, values compared as values."""
    turns = [
        # T1 same call, other spacing and keyword order: name, valid, exact; kv 2/2/2; set 1/1/1
        (call("read_fault_codes", "```python\ntool_call( level=1 , system='发动机' )\n```"),
         glm3("read_fault_codes", system="发动机", level=1)),
        # T2 right tool, value 1.0 for 1 (different JSON values, as for glm4): name, valid, not exact; kv 1/2/2
        (glm3("read_fault_codes", system="发动机", level=1.0), glm3("read_fault_codes", system="发动机", level=1)),
        # T3 right tool, arguments written as JSON (not glm3's form): name, invalid, not exact; kv 0/0/1
        (call("read_fault_codes", '{"system": "发动机"}'), glm3("read_fault_codes", system="发动机")),
        # T4 a function other than tool_call: invalid (chatglm3-6b defines only tool_call); wrong name too
        (call("check_tire", "```python\nprint(wheel='左前')\n```"), glm3("read_fault_codes", system="变速箱")),
    ]
    predictions, references = zip(*turns)
    metrics = tool_call_metrics(list(predictions), list(references), "glm3")
    expected = {
        "turns": 4, "call_turns": 4, "reference_calls": 4, "predicted_calls": 4,
        "call_decision_accuracy": 1.0,
        "call_name_accuracy": 3 / 4,  # all but T4
        "call_argument_validity": 2 / 4,  # T1 T2
        "call_argument_exact_match": 1 / 4,  # T1
        "call_argument_f1": 2 * 3 / (4 + 6),  # tp 2+1+0+0; predicted 2+2+0+0 (invalid: none); reference 2+2+1+1
        "call_set_precision": 1 / 4, "call_set_recall": 1 / 4, "call_set_f1": 2 * 1 / (4 + 4),
        "parallel_turns": 0, "parallel_call_precision": None, "parallel_call_recall": None,
    }
    assert metrics == expected


def test_undefined_scores_are_none():
    """Nothing to divide by gives None (null in the metrics file), not a made-up 0 or 1."""
    text_only = tool_call_metrics(["a", "b"], ["a", "c"])
    assert text_only["call_decision_accuracy"] == 1.0
    for key in ("call_name_accuracy", "call_argument_validity", "call_argument_exact_match", "call_argument_f1",
                "call_set_precision", "call_set_recall", "call_set_f1", "parallel_call_precision",
                "parallel_call_recall"):
        assert text_only[key] is None, key
    missed = tool_call_metrics(["a"], [call("f", '{"a": 1}')])  # nothing predicted: precision undefined, recall 0
    assert missed["call_set_precision"] is None and missed["call_set_recall"] == 0.0 and missed["call_set_f1"] == 0.0
    assert missed["call_argument_f1"] == 0.0 and missed["call_argument_validity"] is None
    assert tool_call_metrics([], [])["call_decision_accuracy"] is None


# ------------------------------------------------------------------------------------------------------------------
# through predict.py --test_path
# ------------------------------------------------------------------------------------------------------------------
TOOLS = [{"type": "function", "function": {"name": "read_fault_codes", "description": "读取车辆的故障码",
                                           "parameters": {"type": "object", "properties": {
                                               "system": {"type": "string"}}, "required": ["system"]}}}]
SYSTEM = {"role": "system", "content": "", "tools": TOOLS}


def assistant_call(arguments):
    return {"role": "assistant", "metadata": "read_fault_codes", "content": arguments}


def answer(text):
    return {"role": "assistant", "content": text}


ENGINE, GEARBOX = '{"system": "发动机"}', '{"system": "变速箱"}'
CONVERSATIONS = [
    [SYSTEM, {"role": "user", "content": "发动机故障灯亮了"}, assistant_call(ENGINE),
     {"role": "observation", "content": '{"codes": ["P0128"]}'}, answer("故障码 P0128：节温器常开。")],
    [SYSTEM, {"role": "user", "content": "发动机和变速箱都查一下"}, assistant_call(ENGINE), assistant_call(GEARBOX),
     {"role": "observation", "content": '{"codes": []}'}, {"role": "observation", "content": '{"codes": ["P0700"]}'},
     answer("变速箱有故障码 P0700。")],
    [SYSTEM, {"role": "user", "content": "你好"}, answer("你好，我是汽车故障诊断助手。")],
]
# What the "model" generates after each prompt, by the prompt's last message: every turn of the three conversations
GENERATED = {
    "发动机故障灯亮了": [assistant_call(GEARBOX)],  # right tool, wrong argument
    '{"codes": ["P0128"]}': [answer("故障码 P0128：节温器常开。")],  # right text
    "发动机和变速箱都查一下": [assistant_call(ENGINE)],  # one of the two parallel calls
    '{"codes": ["P0700"]}': [answer("没有故障。")],  # wrong text
    "你好": [assistant_call(ENGINE)],  # a call where text was due
}


def fake_generation(tokenizer, mode, monkeypatch):
    """generate_batch answers each prompt with the ids training teaches for GENERATED[its last message]: the tokens
    a model emits for those messages, post-processed by predict.py as any generation."""
    by_prompt = {}
    for conversation in CONVERSATIONS:
        starts = [i for i, m in enumerate(conversation) if m["role"] == "assistant" and conversation[i - 1]["role"]
                  != "assistant"]  # 2 and 4; 2 (two calls in a row: one turn) and 6; 2
        for start in starts:
            # as the data reaches the model: tool_data writes glm3 arguments in ChatGLM3's tool_call form
            context = tool_data.conversation_messages(mode, {"conversations": conversation[:start]})
            generated = tool_data.conversation_messages(
                mode, {"conversations": conversation[:start] + GENERATED[context[-1]["content"]]})
            ids, _, _ = template.encode_messages(tokenizer, mode, generated, False)
            prompt = template.encode_context(tokenizer, mode, context)
            assert ids[:len(prompt)] == prompt
            by_prompt[tuple(prompt)] = ids[len(prompt):]
    monkeypatch.setattr(predict, "generate_batch",
                        lambda model, tok, m, prompts, kwargs: [by_prompt[tuple(p)] for p in prompts])


@pytest.mark.parametrize("mode", ["glm3", "glm4"])
def test_predict_scores_every_turn_of_tool_conversations(mode, tiny_dirs, tmp_path, monkeypatch):
    tokenizer = MODE[mode].tokenizer.from_pretrained(tiny_dirs[mode])
    fake_generation(tokenizer, mode, monkeypatch)
    test_path = tmp_path / "tools_test.jsonl"
    test_path.write_text("".join(json.dumps({"conversations": c}, ensure_ascii=False) + "\n" for c in CONVERSATIONS),
                         encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert predict.main(["--mode", mode, "--model_path", tiny_dirs[mode], "--test_path", str(test_path),
                         "--output_path", str(out), "--batch_size", "2"]) == 0
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    # five turns: conversation 1 (call, text), 2 (two parallel calls, text), 3 (text), each with its place
    assert [(line["where"], line["turn"]) for line in lines] == [
        (f"{test_path}:1", 2), (f"{test_path}:1", 4), (f"{test_path}:2", 2), (f"{test_path}:2", 6),
        (f"{test_path}:3", 2)]
    parallel = json.loads(lines[2]["reference"])  # the parallel reference as chat() returns it: both calls
    assert [(c["name"], c["parameters"]) for c in parallel] == [
        ("read_fault_codes", {"system": "发动机"}), ("read_fault_codes", {"system": "变速箱"})]
    written = {"glm4": '{"system": "发动机"}', "glm3": "```python\ntool_call(system='发动机')\n```"}[mode]
    # the arguments as the mode's model writes them (glm3 decodes a space before them: the content is encoded
    # apart from "metadata\n", and sentencepiece's dummy prefix comes back on decoding)
    assert parallel[0]["content"].strip() == written
    assert json.loads(lines[2]["prediction"])["name"] == "read_fault_codes"  # one call: a dict, as chat() returns
    metrics = json.loads(Path(str(out).replace(".jsonl", ".metrics.json")).read_text())
    # text metrics as before over every turn (a call as its JSON text): only turn 2 is identical
    assert metrics["samples"] == 5 and metrics["exact_match"] == 1 / 5
    expected = {
        "turns": 5, "call_turns": 2, "reference_calls": 3, "predicted_calls": 3,
        "call_decision_accuracy": 4 / 5,  # all but "你好"
        "call_name_accuracy": 2 / 3,  # 变速箱 call named right; one of the two parallel calls made
        "call_argument_validity": 3 / 3,
        "call_argument_exact_match": 1 / 3,  # the parallel 发动机 call
        "call_argument_f1": 2 * 1 / (2 + 3),  # tp 0 + 1; predicted 1 + 1; reference 1 + 2
        "call_set_precision": 1 / 3, "call_set_recall": 1 / 3, "call_set_f1": 2 * 1 / (3 + 3),
        "parallel_turns": 1, "parallel_call_precision": 1 / 1, "parallel_call_recall": 1 / 2,
    }
    assert {key: metrics[key] for key in expected} == expected

    # --last_turn_only: the final answers only (two text turns and the call made where text was due)
    out2 = tmp_path / "last.jsonl"
    assert predict.main(["--mode", mode, "--model_path", tiny_dirs[mode], "--test_path", str(test_path),
                         "--output_path", str(out2), "--last_turn_only"]) == 0
    metrics = json.loads((tmp_path / "last.metrics.json").read_text())
    assert [json.loads(line)["turn"] for line in out2.read_text(encoding="utf-8").splitlines()] == [4, 6, 2]
    assert metrics["samples"] == metrics["turns"] == 3 and metrics["exact_match"] == 1 / 3
    assert metrics["call_decision_accuracy"] == 2 / 3 and metrics["call_turns"] == 0
    assert metrics["call_name_accuracy"] is None and metrics["call_argument_validity"] == 1.0
    assert metrics["call_set_precision"] == 0.0 and metrics["call_set_recall"] is None


# ------------------------------------------------------------------------------------------------------------------
# the example set (data/tools_test.jsonl) through predict.py
# ------------------------------------------------------------------------------------------------------------------
CALL_SCORES = ("call_decision_accuracy", "call_name_accuracy", "call_argument_validity", "call_argument_exact_match",
               "call_argument_f1", "call_set_precision", "call_set_recall", "call_set_f1", "parallel_call_precision",
               "parallel_call_recall")
EXAMPLE_TEST = Path(__file__).resolve().parent.parent / "data" / "tools_test.jsonl"


@pytest.mark.parametrize("mode", ["glm3", "glm4"])
def test_example_test_set_through_predict(mode, tiny_dirs, tmp_path, monkeypatch):
    """predict.py --test_path data/tools_test.jsonl: on the tiny random checkpoint it runs and the metrics file has
    every call metric; a "model" that generates exactly the tokens training teaches for each turn scores 1 on all of
    them (glm3: arguments in ChatGLM3's tool_call form, read back by the same reading as chat())."""
    argv = ["--mode", mode, "--model_path", tiny_dirs[mode], "--test_path", str(EXAMPLE_TEST), "--batch_size", "16"]
    out = tmp_path / "tiny.jsonl"
    assert predict.main([*argv, "--output_path", str(out), "--max_new_tokens", "4"]) == 0
    metrics = json.loads((tmp_path / "tiny.metrics.json").read_text())
    assert metrics["turns"] == metrics["samples"] == len(out.read_text(encoding="utf-8").splitlines())
    assert metrics["call_turns"] > 0 and metrics["parallel_turns"] > 0 and set(CALL_SCORES) <= set(metrics)

    tokenizer = MODE[mode].tokenizer.from_pretrained(tiny_dirs[mode])
    taught = {}  # prompt ids -> the answer ids training teaches after them
    for sample in predict.read_test_set(str(EXAMPLE_TEST), mode):
        ids, _, _ = template.encode_messages(tokenizer, mode, sample["messages"], learn_all_turns=False)
        prompt = template.encode_prompt(tokenizer, mode, sample["query"], sample["history"], sample["role"])
        assert ids[:len(prompt)] == prompt
        taught[tuple(prompt)] = template.cut_at_stop(tokenizer, mode, ids[len(prompt):])
    monkeypatch.setattr(predict, "generate_batch", lambda model, tok, m, prompts, kw: [taught[tuple(p)]
                                                                                       for p in prompts])
    assert predict.main([*argv, "--output_path", str(tmp_path / "taught.jsonl")]) == 0
    metrics = json.loads((tmp_path / "taught.metrics.json").read_text())
    assert metrics["exact_match"] == 1.0
    assert {key: metrics[key] for key in CALL_SCORES} == dict.fromkeys(CALL_SCORES, 1.0)
