"""Where a rule of THUDM's lives outside the file one reads (issue 19, A): a config default transformers supplies, a
tokenizer's newest revision, a chat template as transformers renders it, the current tokenizer_config.json layout.
Each test goes through an entry point (model.tiny, train.main, merge_lora.main, chat())."""
import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, one_rank_env
from model import MODE, detect_version, template
from model.tiny import OFFICIAL_TOKENIZER_CONFIGS, write_tiny_checkpoint
from model.tokenization_glm4 import GLM4_SPECIAL_TOKENS

EMBEDDING, HEAD = "transformer.word_embeddings.weight", "lm_head.weight"


@pytest.fixture
def train_in_process(monkeypatch, one_thread):
    """train.main(argv) in this process, a world of one (gloo)."""
    import train

    def run(*argv):
        one_rank_env(monkeypatch)
        return train.main([str(a) for a in argv])
    return run


def train_args(mode, train_type, base, out, *extra):
    return ["--mode", mode, "--train_type", train_type, "--model_name_or_path", base, "--output_dir", out,
            "--train_path", ROOT / "data/train.jsonl", "--max_len", 128, "--max_src_len", 100,
            "--per_device_train_batch_size", 2, "--gradient_accumulation_steps", 1, "--learning_rate", 1e-2,
            "--num_train_epochs", 1, "--max_steps", 1, "--warmup_ratio", 0.0, "--weight_decay", 0.0, *extra]


def weights(directory) -> dict:
    return load_file(os.path.join(directory, "model.safetensors"))


def only_checkpoint(out) -> str:
    (name,) = [n for n in os.listdir(out) if n.startswith("epoch-")]
    return os.path.join(out, name)


# ------------------------------------------------------------------------------------- 1. ChatGLM-6B's tied head
# THUDM/chatglm-6b's config.json has no tie_word_embeddings; the transformers 4.x it runs on defaults it to True
# (PretrainedConfig.__init__: kwargs.pop("tie_word_embeddings", True)), and its ChatGLMForConditionalGeneration has
# get_output_embeddings() = lm_head, so PreTrainedModel.tie_weights() makes lm_head.weight the embedding matrix.
# Its pytorch_model.bin.index.json stores both keys. chatglm2-6b, chatglm3-6b and glm-4-9b-chat say false.
@pytest.mark.parametrize("mode", ["glm", "glm2", "glm3", "glm4"])
def test_tiny_checkpoint_ties_the_head_exactly_where_the_official_model_does(mode, tiny_dirs):
    config = json.loads(open(os.path.join(tiny_dirs[mode], "config.json")).read())
    model = MODE[mode].model.from_pretrained(tiny_dirs[mode], dtype=torch.float32)
    stored = weights(tiny_dirs[mode])
    if mode == "glm":
        assert "tie_word_embeddings" not in config  # silent, as THUDM's
        assert torch.equal(stored[HEAD], stored[EMBEDDING])  # both keys, equal, as THUDM's checkpoint
        assert model.lm_head.weight is model.transformer.word_embeddings.weight
    else:
        assert config["tie_word_embeddings"] is False
        head, embedding = model.transformer.output_layer.weight, model.transformer.embedding.word_embeddings.weight
        assert head is not embedding and not torch.equal(head, embedding)


def test_glm_checkpoint_with_two_different_matrices_loads_as_thudm_runs_it(tiny_dirs, tmp_path, caplog):
    """THUDM's code holds one matrix and copies each key into it in module order: lm_head.weight, loaded last, wins.
    transformers 5 alone would keep the two apart."""
    path = tmp_path / "apart"
    shutil.copytree(tiny_dirs["glm"], path)
    stored = weights(path)
    stored[HEAD] = stored[HEAD] * 2 + 1
    save_file(stored, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    model = MODE["glm"].model.from_pretrained(path, dtype=torch.float32)
    assert model.lm_head.weight is model.transformer.word_embeddings.weight
    assert torch.equal(model.lm_head.weight, stored[HEAD])
    assert "lm_head.weight and transformer.word_embeddings.weight differ" in caplog.text
    # "tie_word_embeddings": false in config.json keeps them apart
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    apart = MODE["glm"].model.from_pretrained(path, dtype=torch.float32)
    assert apart.lm_head.weight is not apart.transformer.word_embeddings.weight
    assert torch.equal(apart.transformer.word_embeddings.weight, stored[EMBEDDING])


@pytest.mark.parametrize("train_type, extra", [
    ("all", []),
    ("freeze", ["--freeze_module_name", "lm_head"]),  # either name of the one matrix selects it
    ("freeze", ["--freeze_module_name", "word_embeddings"]),
])
def test_full_and_freeze_training_of_glm_write_one_matrix_under_both_keys(train_type, extra, tiny_dirs, tmp_path,
                                                                           train_in_process):
    train_in_process(*train_args("glm", train_type, tiny_dirs["glm"], tmp_path / "out", *extra))
    base, written = weights(tiny_dirs["glm"]), weights(only_checkpoint(tmp_path / "out"))
    assert set(written) == set(base)
    assert torch.equal(written[HEAD], written[EMBEDDING])
    assert not torch.equal(written[HEAD], base[HEAD])  # it trained


def test_zero3_full_training_of_glm_writes_one_matrix(tiny_dirs, tmp_path, train_in_process, real_f_linear):
    """ZeRO-3 partitions the one parameter once and gathers it for the embedding and for the head's loss."""
    ds_config = json.loads((ROOT / "ds_zero3_offload.json").read_text())
    for key in ("offload_param", "offload_optimizer"):  # no CPU Adam to build: the partitioning is what is tested
        ds_config["zero_optimization"].pop(key)
    (tmp_path / "zero3.json").write_text(json.dumps(ds_config))
    train_in_process(*train_args("glm", "all", tiny_dirs["glm"], tmp_path / "out", "--ds_file",
                                 tmp_path / "zero3.json"))
    base, written = weights(tiny_dirs["glm"]), weights(only_checkpoint(tmp_path / "out"))
    assert torch.equal(written[HEAD], written[EMBEDDING]) and not torch.equal(written[HEAD], base[HEAD])


def test_lora_on_glm_leaves_the_tie_and_merges_into_one_matrix(tiny_dirs, tmp_path, train_in_process):
    import merge_lora

    train_in_process(*train_args("glm", "lora", tiny_dirs["glm"], tmp_path / "out", "--lora_module_name",
                                 "query_key_value", "--lora_dim", 4))
    adapter = only_checkpoint(tmp_path / "out")
    assert merge_lora.main(["--mode", "glm", "--ori_model_dir", tiny_dirs["glm"], "--model_dir", adapter,
                            "--output_dir", str(tmp_path / "merged")]) == 0
    base, merged = weights(tiny_dirs["glm"]), weights(tmp_path / "merged")
    assert torch.equal(merged[HEAD], merged[EMBEDDING]) and torch.equal(merged[HEAD], base[HEAD])


# ------------------------------------------------------------------------------------------ 2. ChatGLM2's decode
def fake_generate(model, answer_ids, seen):
    """model.generate replaced: records the prompt and answers `answer_ids` then the stop token."""
    def generate(input_ids, **kwargs):
        seen.append(input_ids[0].tolist())
        eos = kwargs["eos_token_id"]
        stop = eos[0] if isinstance(eos, (list, tuple)) else eos
        return torch.cat([input_ids, torch.tensor([answer_ids + [stop]])], dim=1)
    model.generate = generate


def test_glm2_chat_keeps_the_space_before_punctuation(tiny_dirs):
    """THUDM/chatglm2-6b tokenization_chatglm.py since 4e38bef4 ("Fix clean_up_tokenization_spaces", 2023-07-17):
    ChatGLMTokenizer.__init__(..., clean_up_tokenization_spaces=False); its tokenizer_config.json does not set it."""
    model = MODE["glm2"].model.from_pretrained(tiny_dirs["glm2"], dtype=torch.float32)
    tokenizer = MODE["glm2"].tokenizer.from_pretrained(tiny_dirs["glm2"])
    text = "混合 English 和中文 text，标点: ; ! ?  Hello , world . Don 't"
    fake_generate(model, tokenizer.encode_text(text), [])
    response, _ = model.chat(tokenizer, "你好", history=[])
    assert response == text
    assert tokenizer.decode(tokenizer.encode_text("标点: ; ! ?")) == "标点: ; ! ?"


# --------------------------------------------------------------------------------- 3. GLM-4's tool system prompt
# The official template: THUDM/glm-4-9b-chat tokenizer_config.json `chat_template` (the newest revision, read from
# the ModelScope copy in github aifunny/Hate-Detection @ aea1921dc1840e9f954dd61707b6636f660c4b54,
# `chuli/glm4更新包/tokenizer_config.json`, sha256 f891e4d4...; see ../shared/oracle/PROVENANCE.md), rendered with
# transformers 5.24's own machinery (transformers.utils.chat_template_utils.render_jinja_template: jinja2 with
# trim_blocks=True, lstrip_blocks=True and its tojson filter = json.dumps(ensure_ascii=False, sort_keys=False)),
# messages [{"role": "system", "content": "", "tools": TOOLS[k]}, {"role": "user", "content": "你好"}],
# add_generation_prompt=True. The strings below are that output, stored as data.
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "查询城市天气",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "城市名"}},
                   "required": ["city"]}}}
FAULT_CODES = {"type": "function", "function": {  # keys not in sorted order, quotes, non-ASCII
    "name": "read_fault_codes", "parameters": {"vin": "string", "ecu": ["发动机", "ABS"]},
    "description": "Read DTCs \"now\" — café ✓"}}
NO_PARAMETERS = {"type": "function", "function": {"name": "get_time"}}
TOOLS = {"one": [WEATHER], "two": [FAULT_CODES, WEATHER], "no_parameters": [NO_PARAMETERS]}
SYSTEM = ("[gMASK]<sop><|system|>\n你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
          "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具")
WEATHER_SECTION = ('\n## get_weather\n\n{\n    "name": "get_weather",\n    "description": "查询城市天气",\n'
                   '    "parameters": {\n        "type": "object",\n        "properties": {\n            "city": {\n'
                   '                "type": "string",\n                "description": "城市名"\n            }\n'
                   '        },\n        "required": [\n            "city"\n        ]\n    }\n}\n'
                   '在调用上述函数时，请使用 Json 格式表示调用的参数。')
RENDERED = {
    "one": SYSTEM + WEATHER_SECTION + "<|user|>\n你好<|assistant|>",
    "two": SYSTEM + '\n## read_fault_codes\n\n{\n    "name": "read_fault_codes",\n    "parameters": {\n'
                    '        "vin": "string",\n        "ecu": [\n            "发动机",\n            "ABS"\n        ]\n'
                    '    },\n    "description": "Read DTCs \\"now\\" — café ✓"\n}\n'
                    '在调用上述函数时，请使用 Json 格式表示调用的参数。' + WEATHER_SECTION + "<|user|>\n你好<|assistant|>",
    "no_parameters": SYSTEM + '\n## get_time\n\n{\n    "name": "get_time"\n}\n'
                              '在调用上述函数时，请使用 Json 格式表示调用的参数。<|user|>\n你好<|assistant|>',
}
SPECIALS = re.compile("(" + "|".join(re.escape(token) for token in GLM4_SPECIAL_TOKENS) + ")")


def rendered_ids(tokenizer, text: str) -> list[int]:
    """A rendered prompt as ids: the special tokens' names as their ids, the text between them as text."""
    ids = []
    for part in SPECIALS.split(text):
        if part in GLM4_SPECIAL_TOKENS:
            ids.append(tokenizer.get_command(part))
        elif part:
            ids += tokenizer.encode_text(part)
    return ids


@pytest.mark.parametrize("case", sorted(RENDERED))
def test_glm4_chat_prompt_with_tools_is_the_official_template_as_transformers_renders_it(case, tiny_dirs):
    model = MODE["glm4"].model.from_pretrained(tiny_dirs["glm4"], dtype=torch.float32)
    tokenizer = MODE["glm4"].tokenizer.from_pretrained(tiny_dirs["glm4"])
    history = [{"role": "system", "content": "", "tools": TOOLS[case]}]
    seen = []
    fake_generate(model, tokenizer.encode_text("好的"), seen)
    model.chat(tokenizer, "你好", history=history)
    assert seen == [rendered_ids(tokenizer, RENDERED[case])]
    assert template.glm4_tool_prompt(TOOLS[case]) == RENDERED[case][len("[gMASK]<sop><|system|>"):-len(
        "<|user|>\n你好<|assistant|>")]


# ----------------------------------------------------------------- 4. tiny directories in the current official layout
NAMES = {"glm": "THUDM/chatglm-6b", "glm2": "THUDM/chatglm2-6b", "glm3": "THUDM/chatglm3-6b",
         "glm4": "THUDM/glm-4-9b-chat"}


@pytest.mark.parametrize("mode", ["glm", "glm2", "glm3", "glm4"])
def test_tiny_config_carries_thudms_name(mode, tiny_dirs):
    config = json.loads(open(os.path.join(tiny_dirs[mode], "config.json")).read())
    assert config["_name_or_path"] == NAMES[mode]
    config.pop("chatglm_version")  # without our marker the name alone tells glm3 from glm2, as in THUDM's files
    assert detect_version(config) == mode


CONVERSATIONS = {
    "plain": [{"role": "user", "content": "你好"}],
    "multi-turn": [{"role": "system", "content": "你是汽车故障诊断助手。"}, {"role": "user", "content": "你好"},
                   {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "水温高怎么办？"}],
    "tools": [{"role": "system", "content": "Be brief.", "tools": [FAULT_CODES, WEATHER]},
              {"role": "user", "content": "读一下故障码"},
              {"role": "assistant", "metadata": "read_fault_codes", "content": "{\"vin\": \"LSV\"}"},
              {"role": "observation", "content": "{\"codes\": [\"P0217\"]}"}],
}


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_tiny_glm4_tokenizer_config_is_the_current_layout(name, tiny_dirs, tmp_path):
    """THUDM's current glm-4-9b-chat tokenization_chatglm.py knows its 14 special tokens only from
    added_tokens_decoder and the prompt only from chat_template; the chat_template here is our own, and transformers'
    apply_chat_template over it gives model/template.py's ids."""
    path = tiny_dirs["glm4"]
    config = json.loads(open(os.path.join(path, "tokenizer_config.json")).read())
    tokenizer = MODE["glm4"].tokenizer.from_pretrained(path)
    assert {int(i): entry["content"] for i, entry in config["added_tokens_decoder"].items()} == \
        {tokenizer.get_command(token): token for token in GLM4_SPECIAL_TOKENS}
    assert all(entry["special"] for entry in config["added_tokens_decoder"].values())
    messages = CONVERSATIONS[name]
    applied = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                            tokenizer_kwargs={"split_special_tokens": False})["input_ids"]
    assert applied == template.encode_prompt(tokenizer, "glm4", messages[-1]["content"], messages[:-1],
                                             role=messages[-1]["role"])
    # our tokenizer loads the first revision's layout (no added_tokens_decoder, no chat_template) the same way
    shutil.copytree(path, tmp_path / "old")
    (tmp_path / "old" / "tokenizer_config.json").write_text(json.dumps(OFFICIAL_TOKENIZER_CONFIGS["glm4"]))
    old = MODE["glm4"].tokenizer.from_pretrained(tmp_path / "old")
    assert template.encode_prompt(old, "glm4", messages[-1]["content"], messages[:-1], role=messages[-1]["role"]) \
        == template.encode_prompt(tokenizer, "glm4", messages[-1]["content"], messages[:-1], role=messages[-1]["role"])
    assert old.decode(applied) == tokenizer.decode(applied)

