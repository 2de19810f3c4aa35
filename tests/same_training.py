"""Checks that two runs trained the same (packed against unpacked rows, 2 sequence-parallel ranks against one): the
same per-step losses and the same gradients, with tolerances from fp32 and the length of the sums, on any CPU.

Why not the weights after ordinary AdamW steps: AdamW moves every weight by about lr * g / (|g| + eps) in its first
steps, with eps 1e-8. A gradient whose true value is 0 (a key bias, which softmax ignores) holds only rounding
noise, which depends on the machine's kernels and summation order, and that noise becomes a step of +-lr. So the
runs compared here use AdamW with an eps far above every gradient (`linear_steps`): a step moves a weight by
(lr / eps) * m, momentum SGD, so the weights after the steps are a linear record of the gradients, and a gradient
difference can move a weight by at most lr / eps times itself, never more (d/dg of lr * g / (|g| + eps) is at most
lr / eps; see the AdamW update in torch.optim.AdamW's documentation and DeepSpeed's cpu_adam, which train.py uses
under ZeRO offload)."""
import json
from pathlib import Path

import torch

from conftest import ROOT

EPS = 1e3  # far above any gradient of the tiny checkpoints (their global norms are below 100)
STEP = 1e-2  # lr / eps: the SGD learning rate the steps amount to
FP32 = torch.finfo(torch.float32).eps


def linear_steps(ds_file, directory) -> list:
    """train.py flags for SGD-like AdamW steps: a copy of `ds_file` with the large eps (train.py keeps a JSON's own
    eps), lr = STEP * EPS and no weight decay (decoupled decay would move weights by lr * wd * w)."""
    config = json.loads(Path(ds_file).read_text())
    config.setdefault("optimizer", {"type": "AdamW"}).setdefault("params", {})["eps"] = EPS
    path = Path(directory) / f"linear-{Path(ds_file).name}"
    path.write_text(json.dumps(config))
    return ["--ds_file", path, "--learning_rate", STEP * EPS, "--weight_decay", 0.0]


def default_ds_file() -> Path:
    return ROOT / "ds_zero2_no_offload.json"  # train.py's default --ds_file


def grad_norms(output_dir) -> dict:
    """train/grad_norm per step from train.py's tensorboard log: the global norm DeepSpeed computed before clipping."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(output_dir) / "runs"))
    events.Reload()
    return {e.step: e.value for e in events.Scalars("train/grad_norm")}


def lora_start(weights: dict) -> dict:
    """The known starting values of an adapter's weights: PEFT starts every lora_B at zero (init_lora_weights=True)."""
    return {name: torch.zeros_like(w) for name, w in weights.items() if ".lora_B." in name}


def assert_same_updates(trained: dict, reference: dict, start: dict, summed_terms: int) -> None:
    """`trained` took the steps `reference` took, from the same `start`: every weight's change equals the
    reference's up to fp32 rounding. Each gradient is a sum over `summed_terms` labelled tokens, so its rounding
    stays below summed_terms * fp32 eps of its largest terms (the worst case of a sequential sum), and a linear step
    carries that into the weight change; 4 ulp of the weight's own size cover storing the weights. A weight whose
    start is unknown (LoRA's A) is held to the run's largest change."""
    assert trained.keys() == reference.keys()
    changes = {name: (reference[name].float() - start[name].float()).abs().max().item()
               for name in reference if name in start}
    largest = max(changes.values())
    assert largest > 100 * FP32, "the steps changed nothing that can be compared"
    for name, weight in reference.items():
        atol = summed_terms * FP32 * changes.get(name, largest) + 4 * FP32 * weight.abs().max().item()
        torch.testing.assert_close(trained[name].float(), weight.float(), rtol=0, atol=atol, msg=name)


def labelled_tokens(examples) -> int:
    return sum(sum(1 for label in e["labels"][1:] if label != -100) for e in examples)
