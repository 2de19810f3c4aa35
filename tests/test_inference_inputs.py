"""Bad input to predict.py and merge_lora.py, as users pass it: one line naming the file, exit code 2, no traceback
and nothing written; non-UTF-8 text from the terminal is refused without losing the conversation."""
import io
import shutil
import sys

import pytest

import predict
from test_merge_lora import make_lora_adapter, merge_in_process


@pytest.fixture(scope="module")
def glm4_adapter(tiny_dirs, tmp_path_factory):
    return make_lora_adapter("glm4", tiny_dirs["glm4"], tmp_path_factory.mktemp("glm4_adapter") / "adapter")


def copy_of(directory, tmp_path, name):
    copy = tmp_path / name
    shutil.copytree(directory, copy)
    return copy


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(100)


def predict_error(capsys, *argv) -> str:
    assert predict.main([str(a) for a in argv]) == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def merge_error(capsys, *argv) -> str:
    assert merge_in_process(*argv) == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_an_adapter_of_another_version_without_its_training_args(glm4_adapter, tiny_dirs, tmp_path, capsys):
    """Copied on its own (no training_args.json), a glm4 adapter on a glm3 base: its tokenizer file is named."""
    adapter = copy_of(glm4_adapter, tmp_path, "adapter")
    (adapter / "training_args.json").unlink()
    expected = f"{adapter / 'tokenizer.model'} is not a sentencepiece model"
    assert expected in predict_error(capsys, "--mode", "glm3", "--model_path", adapter, "--base_model_path",
                                     tiny_dirs["glm3"], "--query", "你好")
    assert expected in merge_error(capsys, "--mode", "glm3", "--ori_model_dir", tiny_dirs["glm3"], "--model_dir",
                                   adapter, "--output_dir", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_truncated_adapter_and_base_are_named(glm4_adapter, tiny_dirs, tmp_path, capsys):
    adapter = copy_of(glm4_adapter, tmp_path, "adapter")
    truncate(adapter / "adapter_model.safetensors")
    expected = f"{adapter / 'adapter_model.safetensors'}: not a readable safetensors file"
    assert expected in predict_error(capsys, "--mode", "glm4", "--model_path", adapter, "--query", "你好")
    assert expected in merge_error(capsys, "--mode", "glm4", "--ori_model_dir", tiny_dirs["glm4"], "--model_dir",
                                   adapter, "--output_dir", tmp_path / "merged")

    base = copy_of(tiny_dirs["glm4"], tmp_path, "base")
    truncate(base / "model.safetensors")
    expected = f"{base / 'model.safetensors'}: not a readable safetensors file"
    assert expected in merge_error(capsys, "--mode", "glm4", "--ori_model_dir", base, "--model_dir", glm4_adapter,
                                   "--output_dir", tmp_path / "merged")
    assert expected in predict_error(capsys, "--mode", "glm4", "--model_path", base, "--query", "你好")
    assert not (tmp_path / "merged").exists()


def test_text_that_is_not_utf8_is_refused_and_the_chat_goes_on(tiny_dirs, monkeypatch, capsys):
    gbk = b"\xc4\xe3\xba\xc3".decode("utf-8", errors="surrogateescape")  # "你好" in GBK, as Python reads it
    with pytest.raises(SystemExit):
        predict.main(["--mode", "glm3", "--model_path", str(tiny_dirs["glm3"]), "--query", gbk])
    assert "--query is not UTF-8 text" in capsys.readouterr().err

    monkeypatch.setattr(sys, "stdin", io.StringIO(f"你好\n{gbk}\n发动机水温高\nexit\n"))
    assert predict.main(["--mode", "glm3", "--model_path", str(tiny_dirs["glm3"]), "--max_new_tokens", "4",
                         "--do_sample", "False"]) == 0
    turns = capsys.readouterr().out.split("用户：")
    assert len(turns) == 5 and "not UTF-8" in turns[2] and "ChatGLM：" in turns[3]
