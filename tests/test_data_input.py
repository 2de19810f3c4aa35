"""Bad data files stop train.py / predict.py with one line naming the file and the line (or the file, or the flag):
encodings, JSON arrays, JSON that is neither an array nor JSON Lines, directories, and glm3/glm4 role order."""
import codecs
import io
import json
import re
from pathlib import Path

import pytest

from conftest import ROOT, SHARED
from dataset import InstructionDataset, read_records
from model import MODE
from test_predict import bad_predict
from test_train import tiny_run_args, train_in_process  # noqa: F401 (train_in_process is a fixture)

SAMPLE = {"instruction": "你好", "output": "你好！"}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "天气",
                                           "parameters": {"type": "object", "properties": {}}}}]
TIME_TOOL = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]


def jsonl(*samples) -> str:
    return "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)


def train_error(train_in_process, tiny_dirs, tmp_path, train_path, mode="glm3") -> str:
    """The one line train.main() stops with, for --train_path `train_path`."""
    with pytest.raises(SystemExit) as stop:
        train_in_process(*tiny_run_args(mode, "lora", tiny_dirs[mode], tmp_path / "out"), "--train_path", train_path)
    message = str(stop.value)
    assert "\n" not in message
    return message


def load(tiny_dirs, path, mode="glm3", max_len=256, max_src_len=200) -> InstructionDataset:
    tokenizer = MODE[mode].tokenizer.from_pretrained(tiny_dirs[mode])
    return InstructionDataset(str(path), tokenizer, mode, max_len=max_len, max_src_len=max_src_len)


# ------------------------------------------------------------------------------------------------------------------
# encoding
# ------------------------------------------------------------------------------------------------------------------
def test_gbk_line_in_jsonl_names_its_line(tiny_dirs, tmp_path, train_in_process):
    path = tmp_path / "g.jsonl"
    path.write_bytes(jsonl(SAMPLE, SAMPLE).encode() + jsonl(SAMPLE).encode("gbk") + jsonl(SAMPLE).encode())
    # line 3 is {"instruction": "你好" ... in GBK: 你 is c4 e3, after the 17 characters {"instruction": "
    assert train_error(train_in_process, tiny_dirs, tmp_path, path) == \
        f"{path}:3: not UTF-8 text (byte 0xc4 at column 18; save the file as UTF-8)"


def test_stray_byte_in_json_array_names_its_line(tiny_dirs, tmp_path, train_in_process):
    path = tmp_path / "x.json"
    text = json.dumps([SAMPLE, {"instruction": "a", "output": "bXc"}], ensure_ascii=False, indent=2)
    assert text.splitlines()[7] == '    "output": "bXc"'  # line 8
    path.write_bytes(text.encode().replace(b"X", b"\xff"))
    assert train_error(train_in_process, tiny_dirs, tmp_path, path) == \
        f"{path}:8: not UTF-8 text (byte 0xff at column 17; save the file as UTF-8)"


def test_predict_names_the_line_of_a_non_utf8_test_file(tiny_dirs, tmp_path, capsys):
    path = tmp_path / "t.jsonl"
    path.write_bytes(jsonl(SAMPLE).encode() + jsonl(SAMPLE).encode("gbk"))
    line = bad_predict(capsys, "--mode", "glm3", "--model_path", tiny_dirs["glm3"], "--test_path", path,
                       "--output_path", tmp_path / "out.jsonl")
    assert line == f"predict.py: error: {path}:2: not UTF-8 text (byte 0xc4 at column 18; save the file as UTF-8)"


@pytest.mark.parametrize("name", ["bom.jsonl", "bom.json"])
def test_a_utf8_byte_order_mark_is_accepted(name, tiny_dirs, tmp_path):
    samples = [SAMPLE, {"instruction": "再见", "output": "再见！"}]
    text = jsonl(*samples) if name.endswith("jsonl") else json.dumps(samples, ensure_ascii=False, indent=2)
    path = tmp_path / name
    path.write_bytes(codecs.BOM_UTF8 + text.encode())
    assert [record for _, record in read_records(str(path))] == samples
    assert len(load(tiny_dirs, path)) == 2



def test_every_file_is_read_with_one_rule_a_byte_order_mark_is_dropped(tiny_dirs, tmp_path, monkeypatch, capsys):
    """Notepad saves UTF-8 with a byte-order mark. Data files with one were read, but predict.py refused a --tools
    file with one ("Unexpected UTF-8 BOM") and kept U+FEFF at the start of an @FILE tool result, and train.py refused
    a --ds_file with one: every file now goes through model.textfile.read_text (Python's "utf-8-sig" rule)."""
    import sys

    import predict
    import train

    bom = codecs.BOM_UTF8
    tools_file, result_file, ds_file = tmp_path / "tools.json", tmp_path / "result.json", tmp_path / "ds.json"
    tools_file.write_bytes(bom + json.dumps(TOOLS, ensure_ascii=False).encode())
    result_file.write_bytes(bom + b'{"temperature": 20}\n')
    ds_file.write_bytes(bom + (ROOT / "ds_zero2_no_offload.json").read_bytes())
    seen = []

    def chat_turn(model, tokenizer, query, history, role, gen_kwargs, stdout, names=None):
        """The model's side, scripted: a call of the tool on the user's turn, then text from its result."""
        seen.append((role, query, history[0].get("tools")))
        response = {"name": "get_weather", "content": "{}", "parameters": {}} if role == "user" else "晴"
        return response, history + [{"role": role, "content": query}]

    monkeypatch.setattr(predict, "chat_turn", chat_turn)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"天气如何\n@{result_file}\nexit\n"))
    assert predict.main(["--mode", "glm4", "--model_path", tiny_dirs["glm4"], "--tools", str(tools_file)]) == 0, \
        capsys.readouterr().err
    assert seen == [("user", "天气如何", TOOLS), ("observation", '{"temperature": 20}', TOOLS)]
    args = train.parse_args(["--model_name_or_path", "-", "--mode", "glm4", "--train_path", "-", "--output_dir", "-",
                             "--ds_file", str(ds_file)])
    assert args.ds_file == str(ds_file)

# ------------------------------------------------------------------------------------------------------------------
# JSON arrays, JSON Lines and JSON that is neither
# ------------------------------------------------------------------------------------------------------------------
def pretty_array(tmp_path) -> Path:
    """A pretty-printed array whose third element (it has no 'output') starts on line 11."""
    samples = [{"instruction": "你好", "input": "", "output": "你好！"}, SAMPLE, {"instruction": "没有答案"}]
    text = json.dumps(samples, ensure_ascii=False, indent=2)
    assert text.splitlines()[10] == "  {" and text.splitlines()[11] == '    "instruction": "没有答案"'
    path = tmp_path / "arr.json"
    path.write_text(text, encoding="utf-8")
    return path


def test_an_error_in_a_json_array_names_the_line_its_element_starts_on(tiny_dirs, tmp_path, train_in_process):
    path = pretty_array(tmp_path)
    assert [number for number, _ in read_records(str(path))] == [2, 7, 11]
    assert train_error(train_in_process, tiny_dirs, tmp_path, path) == f"{path}:11: sample has no 'output'"


def test_a_syntax_error_in_a_json_array_names_its_line(tmp_path):
    path = tmp_path / "arr.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"output": }\n]\n')
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:3: Expecting value \(column 14\)$"):
        read_records(str(path))


def test_a_json_object_over_several_lines_is_neither_an_array_nor_json_lines(tiny_dirs, tmp_path, train_in_process):
    path = tmp_path / "dict.json"
    path.write_text(json.dumps({"data": [SAMPLE]}, ensure_ascii=False, indent=2), encoding="utf-8")
    assert train_error(train_in_process, tiny_dirs, tmp_path, path) == \
        f"{path}: the file holds one JSON object spread over several lines; it must hold a JSON array of samples " \
        f"or one JSON object per line (JSON Lines)"


def test_a_malformed_json_lines_line_names_its_line(tiny_dirs, tmp_path, train_in_process):
    path = tmp_path / "bad.jsonl"
    path.write_text(jsonl(SAMPLE, SAMPLE) + '{"instruction": "a" "output": "b"}\n' + jsonl(SAMPLE), encoding="utf-8")
    assert train_error(train_in_process, tiny_dirs, tmp_path, path) == \
        f"{path}:3: Expecting ',' delimiter (column 21)"


def test_a_sample_spread_over_lines_in_json_lines_says_so(tmp_path):
    path = tmp_path / "pretty.jsonl"
    path.write_text(jsonl(SAMPLE) + json.dumps(SAMPLE, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    with pytest.raises(ValueError) as error:
        read_records(str(path))
    assert str(error.value) == f"{path}:2: Expecting property name enclosed in double quotes (column 2); the sample " \
                               f"on lines 2-5 must be on one line (JSON Lines), or make the file a JSON array"


def test_json_lines_are_split_on_newlines_only(tmp_path):
    """U+2028, U+0085 ... are line breaks to str.splitlines() but may stand unescaped in a JSON string."""
    samples = [{"instruction": "a", "output": "one\u2028two\x85three"}, SAMPLE]
    path = tmp_path / "u.jsonl"
    path.write_text(jsonl(*samples).replace("\n", "\r\n"), encoding="utf-8", newline="")
    assert read_records(str(path)) == [(1, samples[0]), (2, samples[1])]


def test_a_directory_as_train_path_is_named_a_directory(tiny_dirs, tmp_path, train_in_process):
    directory = tmp_path / "data"
    directory.mkdir()
    assert train_error(train_in_process, tiny_dirs, tmp_path, directory) == \
        f"{directory}: is a directory, not a data file (JSON Lines or a JSON array)"


# ------------------------------------------------------------------------------------------------------------------
# glm3 / glm4: role order
# ------------------------------------------------------------------------------------------------------------------
def turn(role, content="x", **extra):
    return {"role": role, "content": content, **extra}


STARTS_WRONG = "the conversation starts with an {} turn (after any system messages it must start with a user turn)"
OBSERVATION_WRONG = ("turn {} is an observation following the {} turn (an observation must come right after the "
                     "assistant turn whose tool call it answers, or after another observation)")


@pytest.mark.parametrize("mode", ["glm3", "glm4"])
@pytest.mark.parametrize("conversation,rule", [
    ([turn("assistant"), turn("user"), turn("assistant")], STARTS_WRONG.format("assistant")),
    ([turn("observation"), turn("assistant")], STARTS_WRONG.format("observation")),
    ([turn("system"), turn("assistant")], STARTS_WRONG.format("assistant")),
    ([turn("system", tools=TOOLS), turn("system"), turn("observation"), turn("assistant")],
     STARTS_WRONG.format("observation")),
    ([turn("user"), turn("observation"), turn("assistant")], OBSERVATION_WRONG.format(2, "user")),
    ([turn("user"), turn("assistant"), turn("user"), turn("observation"), turn("observation"), turn("assistant")],
     OBSERVATION_WRONG.format(4, "user")),
    ([turn("user"), turn("assistant"), turn("system"), turn("observation"), turn("assistant")],
     OBSERVATION_WRONG.format(4, "system")),
])
def test_role_order_the_official_format_cannot_hold(mode, conversation, rule, tiny_dirs, tmp_path, train_in_process):
    path = tmp_path / "bad.jsonl"
    path.write_text(jsonl(SAMPLE, {"conversations": conversation}), encoding="utf-8")
    assert train_error(train_in_process, tiny_dirs, tmp_path, path, mode) == f"{path}:2: --mode {mode}: {rule}"


@pytest.mark.parametrize("mode", ["glm3", "glm4"])
def test_role_orders_the_official_formats_allow_still_load(mode, tiny_dirs, tmp_path):
    conversations = [
        [turn("user"), turn("assistant"), turn("assistant")],  # two assistant turns in a row
        [turn("system", tools=TOOLS), turn("user", "北京天气"),
         turn("assistant", '{"city": "北京"}', metadata="get_weather"), turn("observation", '{"weather": "晴"}'),
         turn("assistant", "晴天")],  # tool call -> observation -> answer
        [turn("system", tools=TOOLS), turn("user"), turn("assistant", "{}", metadata="get_weather"),
         turn("observation"), turn("assistant", "{}", metadata="get_weather"), turn("observation"),
         turn("assistant")],
        [turn("system", tools=TOOLS + TIME_TOOL), turn("user"), turn("assistant", "{}", metadata="get_weather"),
         turn("assistant", "{}", metadata="get_time"), turn("observation"), turn("observation"),
         turn("assistant")],  # two calls, then their two results (calls name declared tools: tests/test_tool_data.py)
        [turn("system"), turn("system"), turn("user"), turn("assistant"), turn("system"), turn("user"),
         turn("assistant")],
        [turn("user"), turn("user"), turn("assistant")],
    ]
    path = tmp_path / "ok.jsonl"
    path.write_text(jsonl(*({"conversations": c} for c in conversations)), encoding="utf-8")
    # room for the tools: truncation never cuts them (a sample that cannot fit is skipped)
    assert len(load(tiny_dirs, path, mode, max_len=1024, max_src_len=960)) == len(conversations)
    shipped = [ROOT / "data" / name for name in ("tools.jsonl", "conversations.jsonl", "multiturn.jsonl")]
    for data in shipped + sorted(Path(SHARED, "data").glob("*.json*")):
        assert len(load(tiny_dirs, data, mode, max_len=1024, max_src_len=960)) == len(read_records(str(data))), data
