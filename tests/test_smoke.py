"""The user's path in a few seconds per step, for `.ci/newest` (pytest -m newest) as much as for CI: a tiny
checkpoint, two optimizer steps of LoRA and of P-Tuning under the deepspeed launcher, then the trained checkpoints
generate in a left-padded batch exactly as one prompt at a time, and chat() answers."""
import pytest
import torch

import predict
from model import template
from test_train import common_args, run_train
from inference import load_for_inference

pytestmark = pytest.mark.newest
QUERIES = ["你好", "发动机水温高，风扇低速转动。", "What is the fault?"]


@pytest.mark.parametrize("train_type", ["lora", "ptuning"])
def test_two_steps_then_batched_generation_and_chat(train_type, tiny_dirs, tmp_path, one_thread):
    mode = "glm3"
    output_dir = tmp_path / "out"
    run_train(tiny_dirs[mode], output_dir, *common_args(mode, train_type, epochs=1), "--max_steps", 2, launcher=True)
    checkpoint = next(output_dir.glob("epoch-*-step-2"))
    model, tokenizer = load_for_inference(mode, checkpoint)

    prompts = [template.encode_prompt(tokenizer, mode, q) for q in QUERIES]
    gen_kwargs = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    batched = predict.generate_batch(model, tokenizer, mode, prompts, gen_kwargs)
    assert batched == [predict.generate_batch(model, tokenizer, mode, [p], gen_kwargs)[0] for p in prompts]

    torch.manual_seed(0)
    response, history = model.chat(tokenizer, QUERIES[0], history=[], max_new_tokens=6, do_sample=False)
    assert isinstance(response, str) and history[-1]["role"] == "assistant"
