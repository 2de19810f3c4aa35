"""The user's path through the scripts, once per train type, as the README's "Your own fine-tune, step by step" shows
it: train.py -> predict.py --query -> merge_lora.py (adapters) -> predict.py on the merged model -> web_demo.py's
loader, on the tiny ChatGLM3 checkpoint. After training only the flags that section shows: --mode and the checkpoint,
no --base_model_path and no --quantization_bit (issue 33: a QLoRA adapter crashed predict.py and merge_lora.py unless
the user repeated --quantization_bit, since they kept bitsandbytes out of their process by the command line alone).

train.py, merge_lora.py and predict.py run in this process (their main functions); where the scripts' own process
state is what is tested (whether bitsandbytes stays importable, decided before peft is imported), QLoRA's predict.py
and merge_lora.py run as the user starts them."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT, STEP_BY_STEP_TRAIN_TYPES

pytest.importorskip("bitsandbytes")  # QLoRA is among the train types

QUERY = "你好"
ADAPTERS = ("lora", "qlora4")  # what merge_lora.py merges; the others are full checkpoints or a prefix already
ANSWER_TOKENS = "4"  # --max_new_tokens: a few tokens show the model answers; loading is what is tested


def predict_in_process(capsys, model_path) -> str:
    """`python predict.py --mode glm3 --model_path PATH --query 你好` (main, in this process): its stdout."""
    import predict

    capsys.readouterr()
    code = predict.main(["--mode", "glm3", "--model_path", str(model_path), "--query", QUERY,
                         "--max_new_tokens", ANSWER_TOKENS])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    return captured.out


def run_script(script, *args) -> subprocess.CompletedProcess:
    """A script in its own process, as the user starts it."""
    result = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, capture_output=True,
                            text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def served_answer(model_path):
    """(model, answer) as web_demo.py loads the checkpoint (its flags, its loader) and answers greedily, printed as
    predict.py prints an answer."""
    import web_demo
    from predict import answer_text

    model, tokenizer = web_demo.load_model(web_demo.parse_args(["--mode", "glm3", "--model_path", str(model_path)]))
    response, _ = model.chat(tokenizer, QUERY, history=[], do_sample=False, max_new_tokens=int(ANSWER_TOKENS))
    return model, answer_text(response) + "\n"


def quantized_layers(model) -> int:
    import quantization
    return len(list(quantization.quantized_layers(model)))


@pytest.mark.parametrize("train_type", STEP_BY_STEP_TRAIN_TYPES)
def test_trained_checkpoint_answers_merges_and_serves(train_type, trained_glm3, tiny_dirs, tmp_path, capsys):
    checkpoint = trained_glm3(train_type)
    if train_type == "qlora4":  # predict.py loads the base 4-bit as the run record says, untold
        result = run_script("predict.py", "--mode", "glm3", "--model_path", checkpoint, "--query", QUERY,
                            "--max_new_tokens", ANSWER_TOKENS)
        assert "base 4-bit (as the adapter was trained" in result.stderr, result.stderr[-3000:]
        served, _ = served_answer(checkpoint)
        assert quantized_layers(served) > 0  # web_demo.py answers on the base as it was trained, too
    else:  # in one process greedy decoding of the same weights gives the same answer
        answer = predict_in_process(capsys, checkpoint)
        served, served_text = served_answer(checkpoint)
        assert served_text == answer and quantized_layers(served) == 0
    if train_type not in ADAPTERS:
        return

    merged = tmp_path / "merged"
    merge_args = ["--mode", "glm3", "--ori_model_dir", tiny_dirs["glm3"], "--model_dir", checkpoint,
                  "--output_dir", merged]
    if train_type == "qlora4":  # merge_lora.py compares with what was trained: the adapter on the 4-bit base
        result = run_script("merge_lora.py", *merge_args)
        assert "merged vs what was trained (4-bit base + adapter)" in result.stdout, result.stdout[-2000:]
    else:
        import merge_lora
        assert merge_lora.main([str(arg) for arg in merge_args]) == 0, capsys.readouterr().err[-3000:]
    answer = predict_in_process(capsys, merged)
    served, served_text = served_answer(merged)
    assert served_text == answer and quantized_layers(served) == 0  # the merged model is full precision


def test_quantized_load_without_bitsandbytes_says_so_in_one_line(trained_glm3, tiny_dirs, tmp_path, capsys,
                                                                 monkeypatch, caplog):
    """Where bitsandbytes cannot be imported, a QLoRA adapter's quantized base cannot load: predict.py says so in one
    line with the way out (--quantization_bit 0, which then answers); merge_lora.py merges (the merge needs no
    bitsandbytes) and skips its comparison with the quantized base, saying why."""
    import merge_lora
    import predict

    checkpoint = trained_glm3("qlora4")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what `import` and find_spec see where it is not installed
    capsys.readouterr()
    assert predict.main(["--mode", "glm3", "--model_path", checkpoint, "--query", QUERY]) == 2
    error = capsys.readouterr().err
    assert error == (f"predict.py: error: {checkpoint}: the base loads 4-bit (as the adapter was trained, "
                     f"training_args.json), but bitsandbytes is not installed (pip install 'bitsandbytes>=0.50,<1'): "
                     f"install it, or pass --quantization_bit 0 to load the base unquantized\n")
    assert predict.main(["--mode", "glm3", "--model_path", checkpoint, "--query", QUERY, "--max_new_tokens",
                         ANSWER_TOKENS, "--quantization_bit", "0"]) == 0, capsys.readouterr().err[-3000:]

    assert merge_lora.main(["--mode", "glm3", "--ori_model_dir", str(tiny_dirs["glm3"]), "--model_dir", checkpoint,
                            "--output_dir", str(tmp_path / "merged")]) == 0, capsys.readouterr().err[-3000:]
    assert "merged vs what was trained" not in capsys.readouterr().out
    assert "but bitsandbytes is not installed (pip install 'bitsandbytes>=0.50,<1'): the comparison of the merged " \
           "model with what was trained is skipped" in caplog.text
