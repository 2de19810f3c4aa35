"""GLM-4's tiktoken tokenizer and chat template on the tiny ranks file built by model.tiktoken_build.

The expected ids are built here independently of model/: tiktoken's own loader reads the ranks file, tiktoken's own
Encoding applies THUDM's pre-tokenisation regex (written out below), and the special ids are counted from the file
as the official tokenizer counts them (official: n = 151329)."""
import base64
import json
import os

import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from model import MODE, template
from model.tiktoken_build import build_ranks_file
from model.tokenization_glm4 import ChatGLM4Tokenizer

# THUDM's GLM-4 tokenization_chatglm.py: OpenAI's cl100k pattern as first published.
OFFICIAL_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                    r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Official order after the ranks: 151329 <|endoftext|> ... 151342 <|end_of_video|>.
OFFICIAL_SPECIALS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                     "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
                     "<|begin_of_video|>", "<|end_of_video|>"]
BATTERY = [
    "发动机水温高，风扇低速转动。", "Hello, world! It's 2024; we'll see.", "😀👍🏽 emoji ZWJ 👨‍👩‍👧", "",
    "  leading and trailing  ", "tabs\tand\nnew\n\nlines\r\n", "\n\n\n", "    四个空格  两个", "x" + " " * 85 + "y",
    "“引号”（括号）！？…—", "Ünïcödé ñ ß ø", "数字123456789和English混合mixed", "\u0000\x7f\u200b",
    "<|user|> typed by a user, [gMASK]<sop> too", "def f(x):\n    return x ** 2  # comment\n",
]


@pytest.fixture(scope="module")
def ranks_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("glm4-tok")
    build_ranks_file(str(directory))
    return str(directory)


@pytest.fixture(scope="module")
def tok(ranks_dir):
    return ChatGLM4Tokenizer.from_pretrained(ranks_dir)


@pytest.fixture(scope="module")
def reference(ranks_dir):
    """tiktoken itself on the same file and regex, and the official special ids."""
    ranks = load_tiktoken_bpe(os.path.join(ranks_dir, "tokenizer.model"))
    encoding = tiktoken.Encoding(name="glm4-reference", pat_str=OFFICIAL_PATTERN, mergeable_ranks=ranks,
                                 special_tokens={})
    specials = {name: len(ranks) + i for i, name in enumerate(OFFICIAL_SPECIALS)}
    return encoding, specials


def test_ranks_file_layout(ranks_dir):
    lines = open(os.path.join(ranks_dir, "tokenizer.model"), encoding="ascii").read().splitlines()
    tokens = [base64.b64decode(line.split()[0]) for line in lines]
    assert [int(line.split()[1]) for line in lines] == list(range(len(lines))) and len(lines) == 1024
    assert tokens[:256] == [bytes([b]) for b in range(256)]  # every byte is a rank: any text round-trips
    assert len(set(tokens)) == len(tokens)
    assert build_ranks_file(str(ranks_dir) + "/again.model") and \
        open(os.path.join(ranks_dir, "again.model"), "rb").read() == \
        open(os.path.join(ranks_dir, "tokenizer.model"), "rb").read()  # the same file on every build


def test_special_ids_follow_the_ranks(tok, reference):
    _, specials = reference
    n = 1024
    assert [tok.get_command(name) for name in OFFICIAL_SPECIALS] == [specials[name] for name in OFFICIAL_SPECIALS]
    assert specials["<|endoftext|>"] == n and specials["<|observation|>"] == n + 9
    assert tok.vocab_size == len(tok) == n + 14
    assert tok.eos_token_id == tok.pad_token_id == specials["<|endoftext|>"] and tok.bos_token_id is None
    assert tok.padding_side == "left"
    assert template.stop_token_ids(tok, "glm4") == [n, n + 7, n + 9]  # official [151329, 151336, 151338]


@pytest.mark.parametrize("text", BATTERY)
def test_ids_equal_tiktoken_and_round_trip(tok, reference, text):
    encoding, _ = reference
    ids = tok.encode_text(text)
    assert ids == encoding.encode(text, disallowed_special=())
    assert tok(text, add_special_tokens=False)["input_ids"] == ids
    assert tok.decode(ids) == text
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text


def test_pre_tokenisation_is_thudms_cl100k_regex(tmp_path, reference):
    """A hand-made ranks file with a token b"\\n " shows the regex: THUDM's pattern splits "\\n " at the end of a text
    into "\\n" and " " (tiktoken's current cl100k pattern keeps them together and would give the merged token)."""
    tokens = [bytes([b]) for b in range(256)] + [b"\n ", b"ab"]
    (tmp_path / "tokenizer.model").write_text("".join(f"{base64.b64encode(t).decode()} {i}\n"
                                                      for i, t in enumerate(tokens)))
    small = ChatGLM4Tokenizer.from_pretrained(str(tmp_path))
    assert small.encode_text("ab\n ") == [257, 10, 32]
    assert small.encode_text("ab\n x") == [257, 10, 32, 120]  # "\n" then " x": the space joins the word
    assert small.get_command("<|endoftext|>") == 258


def test_plain_text_never_yields_special_ids(tok, reference):
    _, specials = reference
    text = "".join(OFFICIAL_SPECIALS) + " <|user|>你好<|assistant|>"
    for ids in (tok.encode_text(text), tok(text)["input_ids"][2:], tok.encode(text, add_special_tokens=False)):
        assert not set(ids) & set(specials.values())
        assert tok.decode(ids) == text


def test_inputs_padding_and_decoding(tok, reference):
    encoding, specials = reference
    gmask_sop = [specials["[gMASK]"], specials["<sop>"]]
    assert tok("你好")["input_ids"] == gmask_sop + encoding.encode("你好")  # no BOS: [gMASK] <sop> starts
    assert tok("你好", return_special_tokens_mask=True)["special_tokens_mask"] == [1, 1] + [0] * len(
        encoding.encode("你好"))
    batch = tok(["a", "longer text 发动机"], padding=True, return_tensors="pt")
    short = tok("a")["input_ids"]
    pad = batch["input_ids"].shape[1] - len(short)
    assert batch["input_ids"][0].tolist() == [specials["<|endoftext|>"]] * pad + short
    assert batch["attention_mask"][0].tolist() == [0] * pad + [1] * len(short)
    ids = [specials["<|user|>"]] + encoding.encode("\n你好") + [specials["<|assistant|>"]]
    assert tok.decode(ids) == "<|user|>\n你好<|assistant|>"
    assert tok.decode(ids, skip_special_tokens=True) == "\n你好"
    assert tok.decode([tok.vocab_size + 3]) == ""  # ids of the padded embedding have no text


def test_save_reload_and_errors(tok, ranks_dir, tmp_path):
    tok.save_pretrained(str(tmp_path))
    assert open(tmp_path / "tokenizer.model", "rb").read() == open(os.path.join(ranks_dir, "tokenizer.model"),
                                                                     "rb").read()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "ChatGLM4Tokenizer" and "auto_map" not in config
    again = ChatGLM4Tokenizer.from_pretrained(str(tmp_path))
    assert again.encode_text(BATTERY[0]) == tok.encode_text(BATTERY[0]) and again.eos_token_id == tok.eos_token_id
    # the official tokenizer_config.json (auto_map to its remote code, its own class name) loads as well
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLM4Tokenizer", None]}, "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "padding_side": "left", "clean_up_tokenization_spaces": False,
        "do_lower_case": False, "model_max_length": 128000, "remove_space": False,
        "tokenizer_class": "ChatGLM4Tokenizer"}))
    official = ChatGLM4Tokenizer.from_pretrained(str(tmp_path))
    assert official(BATTERY[1])["input_ids"] == tok(BATTERY[1])["input_ids"]

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"tokenizer.model not found: not a GLM-4 checkpoint directory"):
        ChatGLM4Tokenizer.from_pretrained(str(empty))
    (empty / "tokenizer.model").write_bytes(b"\nnot a ranks file at all\n")
    with pytest.raises(ValueError, match=r"tokenizer.model:2: not a tiktoken ranks line") as info:
        ChatGLM4Tokenizer.from_pretrained(str(empty))
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------- chat template
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "查询城市天气",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "城市名"}},
                   "required": ["city"]}}}]
# The official tool system prompt of GLM-4 (glm-4-9b-chat's chat template as transformers renders it, trim_blocks=True:
# one newline before "## name"; tests/test_official_semantics.py has the rendered strings), written out as the rule.
TOOL_TEXT = ("\n你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，你的任务是针对用户的问题和要求"
             "提供适当的答复和支持。\n\n# 可用工具\n## get_weather\n\n{\n    \"name\": \"get_weather\",\n"
             "    \"description\": \"查询城市天气\",\n    \"parameters\": {\n        \"type\": \"object\",\n"
             "        \"properties\": {\n            \"city\": {\n                \"type\": \"string\",\n"
             "                \"description\": \"城市名\"\n            }\n        },\n        \"required\": [\n"
             "            \"city\"\n        ]\n    }\n}\n在调用上述函数时，请使用 Json 格式表示调用的参数。")
CONVERSATION = [
    {"role": "system", "content": "你是汽车故障诊断助手。"},
    {"role": "user", "content": "你好"},
    {"role": "assistant", "content": "你好！"},
    {"role": "system", "content": "", "tools": TOOLS},
    {"role": "user", "content": "北京天气怎么样？"},
    {"role": "assistant", "metadata": "get_weather", "content": "{\"city\": \"北京\"}"},
    {"role": "observation", "content": "{\"weather\": \"晴\", \"temperature\": 20}"},
    {"role": "assistant", "content": "北京今天晴，20度。"},
]


def official_ids(encoding, specials, messages, generation_prompt):
    """The official rule: [gMASK]<sop>, then per message with content <|role|>{metadata}\\n{content} (one text), a
    message with tools first <|system|> + the tool text; <|assistant|> to ask for an answer."""
    ids = [specials["[gMASK]"], specials["<sop>"]]
    for message in messages:
        if "tools" in message:
            ids += [specials["<|system|>"]] + encoding.encode(TOOL_TEXT)
        if message["content"]:
            ids += [specials[f"<|{message['role']}|>"]] + encoding.encode(
                message.get("metadata", "") + "\n" + message["content"])
    return ids + ([specials["<|assistant|>"]] if generation_prompt else [])


def test_tool_prompt_text_is_the_official_one():
    assert template.glm4_tool_prompt(TOOLS) == TOOL_TEXT


@pytest.mark.parametrize("cut", [2, 5, 7])
def test_chat_prompt_ids_are_the_official_ones(tok, reference, cut):
    """system, user, assistant, a system message with tools, a tool call, an observation: the prompt chat() and
    predict.py feed the model for the conversation up to message `cut` (which is the query)."""
    encoding, specials = reference
    history, query = CONVERSATION[:cut - 1], CONVERSATION[cut - 1]
    ids = template.encode_prompt(tok, "glm4", query["content"], history, role=query["role"])
    assert ids == official_ids(encoding, specials, CONVERSATION[:cut], generation_prompt=True)


def test_training_labels_follow_the_official_finetune_demo(tok, reference):
    """THUDM's GLM-4 finetune_demo: every token after an <|assistant|> up to the next role token is learned, and that
    role token too; <|user|> is appended after the last answer. Here written as a mask over the official ids."""
    encoding, specials = reference
    ids, labels, answer_start = template.encode_messages(tok, "glm4", CONVERSATION)
    full = official_ids(encoding, specials, CONVERSATION, generation_prompt=False) + [specials["<|user|>"]]
    assert ids == full
    role_ids = {specials[f"<|{role}|>"] for role in template.ROLES}
    expected, in_answer = [], False
    for token in full:
        if token in role_ids:
            expected.append(token if in_answer else -100)
            in_answer = token == specials["<|assistant|>"]
        else:
            expected.append(token if in_answer else -100)
    assert labels == expected
    assert tok.decode([t for t in labels if t != -100]) == (
        "\n你好！<|system|>get_weather\n{\"city\": \"北京\"}<|observation|>\n北京今天晴，20度。<|user|>")
    assert ids[:answer_start] == official_ids(encoding, specials, CONVERSATION[:-1], generation_prompt=True)
    # --last_turn_only: the last answer and the <|user|> after it
    _, last_only, _ = template.encode_messages(tok, "glm4", CONVERSATION, learn_all_turns=False)
    assert tok.decode([t for t in last_only if t != -100]) == "\n北京今天晴，20度。<|user|>"


def test_bad_tools_are_one_line_errors(tok):
    for tools, message in (({"name": "x"}, "'tools' must be a list"),
                           ([{"name": "get_weather", "parameters": {}}], "every tool must be"),
                           ([{"type": "python"}], "every tool must be")):
        with pytest.raises(ValueError, match=message):
            template.encode_prompt(tok, "glm4", "hi", [{"role": "system", "content": "", "tools": tools}])


def test_mode_registry(ranks_dir):
    spec = MODE["glm4"]
    assert spec.tokenizer is ChatGLM4Tokenizer and spec.tokenizer_file == "tokenizer.model"
