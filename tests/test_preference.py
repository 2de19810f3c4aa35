"""Preference training (--stage dpo / orpo, preference.py) checked against TRL (a test-only dependency, pinned in
constraints.txt: trl 1.16.0).

The anchor: TRL's own loss code, fed log-probabilities of the same tiny model. DPO: `trl.DPOTrainer._compute_loss`
(trl/trainer/dpo_trainer.py, loss_type "sigmoid", f_divergence_type "reverse_kl", precomputed reference) on a model
wrapper that returns the per-token log-probabilities its fused head would (`log_probs`, 0 where the label is -100,
plus the entropy / mean-logit / top-1 fields it logs). ORPO: `ORPOTrainer.odds_ratio_loss` and
`ORPOTrainer.get_batch_logps(average_log_prob=True)` (trl/experimental/orpo/orpo_trainer.py); TRL's NLL term also
learns the prompt tokens, the paper's and ours only the answer, so the NLL is the answer's mean log-probability.
The losses, rewards and gradients must agree within fp32 rounding; then train.py's own logged dev metrics after a
real step are compared with TRL's on the checkpoint it wrote.
"""
import json
import os
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT
from test_train import train_in_process  # noqa: F401 (a fixture)

trl = pytest.importorskip("trl", reason="trl is the test-only anchor of preference training (requirements.txt)")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

PAIRS = ROOT / "data" / "pairs_train.jsonl"
DEV_PAIRS = ROOT / "data" / "pairs_dev.jsonl"
FP32_RTOL = 1e-5  # sums of ~100 fp32 log-probabilities of magnitude ~5: a few ulp each


class Engine(SimpleNamespace):
    """What preference.PreferenceObjective needs of a DeepSpeed engine: the module, its device, calling it."""

    def __call__(self, **kwargs):
        return self.module(**kwargs)


def pair_batch(tokenizer, mode, path, count):
    import preference
    data = preference.PreferenceDataset(str(path), tokenizer, mode, max_len=256, max_src_len=200)
    return preference.PairCollator(tokenizer.pad_token_id)([data[i] for i in range(count)])


class TrlLogProbModel(torch.nn.Module):
    """A causal LM as TRL 1.16's DPOTrainer calls it (`labels=..., fused_lm_head=True`): per-token log-probabilities
    of the labels (0 where -100), entropy, mean logit and top-1 hits, computed here with plain torch from the
    model's logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels, use_cache=False, fused_lm_head=True, **unused):
        logits = self.model(input_ids=input_ids, return_logits=True).logits[:, :-1].float()
        targets = labels[:, 1:]
        mask = targets != -100
        logps = torch.log_softmax(logits, -1)
        picked = logps.gather(2, targets.clamp(min=0).unsqueeze(2)).squeeze(2) * mask
        return SimpleNamespace(log_probs=picked, entropy=-(logps.exp() * logps).sum(-1), mean_logits=logits.mean(-1),
                               is_top1=logits.argmax(-1) == targets)


def trl_dpo(model, batch, ref_chosen, ref_rejected, beta):
    """TRL's DPO loss and metrics on our pair batch (TRL's layout: chosen rows, then rejected rows)."""
    from trl.trainer.dpo_trainer import DPOTrainer

    completion_mask = (batch["labels"] != -100).long()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": torch.ones_like(batch["input_ids"]),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t)
    trainer = SimpleNamespace(model=model, accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
                              precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=["sigmoid"],
                              loss_weights=[1.0], beta=beta, label_smoothing=0.0, use_weighting=False,
                              _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    loss = DPOTrainer._compute_loss(trainer, TrlLogProbModel(model), inputs, return_outputs=False)
    mode = "train" if model.training else "eval"  # where TRL files its metrics
    return loss, {k: v[-1] for k, v in trainer._metrics[mode].items()}


def trl_orpo(model, batch, beta):
    """TRL's odds-ratio term and per-answer mean log-probabilities; the NLL of the chosen answer (answer tokens)."""
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    logits = model(input_ids=batch["input_ids"], return_logits=True).logits.float()
    mean_logps = ORPOTrainer.get_batch_logps(logits, batch["labels"], average_log_prob=True)
    chosen, rejected = mean_logps.chunk(2)
    trainer = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device=torch.device("cpu")))
    ratio_losses, chosen_rewards, rejected_rewards, _, _ = ORPOTrainer.odds_ratio_loss(trainer, chosen, rejected)
    return (-chosen - ratio_losses).mean(), chosen_rewards, rejected_rewards


def perturbed(model, seed, scale=0.05):
    """The model with every weight moved a little (a policy that differs from its reference)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return model


@pytest.fixture(scope="module")
def glm3(tiny_dirs):
    from model import MODE
    base = tiny_dirs["glm3"]
    return base, MODE["glm3"].tokenizer.from_pretrained(base)


def test_dpo_loss_rewards_and_gradients_equal_trl(glm3):
    import preference
    from model import MODE

    base, tokenizer = glm3
    batch = pair_batch(tokenizer, "glm3", PAIRS, 3)
    reference = MODE["glm3"].model.from_pretrained(base).eval()
    with torch.no_grad():
        ref_logps, _ = preference.sequence_logps(reference(input_ids=batch["input_ids"], return_logits=True).logits,
                                                 batch["labels"])
    ref_chosen, ref_rejected = ref_logps.chunk(2)
    policy = perturbed(MODE["glm3"].model.from_pretrained(base), seed=1).eval()
    objective = preference.PreferenceObjective(SimpleNamespace(stage="dpo", pref_beta=0.3, pref_label_smoothing=0.0,
                                                               train_type="all", ref_model_path=None))
    objective.reference["train"] = torch.stack([ref_chosen, ref_rejected], dim=1)
    loss_sum, stats = objective.loss(Engine(module=policy, device=torch.device("cpu")), batch)
    ours = loss_sum / objective.units(batch)
    ours.backward()
    our_grads = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()

    theirs, metrics = trl_dpo(policy, batch, ref_chosen, ref_rejected, beta=0.3)
    theirs.backward()
    assert ours.item() == pytest.approx(theirs.item(), rel=FP32_RTOL)
    assert abs(ours.item() - 0.6931) > 1e-3, "policy and reference must differ for the check to bite"
    described = objective.describe(stats.tolist(), objective.units(batch))
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert described[name] == pytest.approx(metrics[name], rel=FP32_RTOL, abs=1e-6), name
    assert described["rewards/accuracy"] == pytest.approx(metrics["rewards/accuracies"])
    for mine, parameter in zip(our_grads, policy.parameters()):
        torch.testing.assert_close(mine, parameter.grad, rtol=1e-4, atol=1e-7)


def test_dpo_label_smoothing_is_conservative_dpo():
    """cDPO (Mitchell 2023; TRL's sigmoid loss before 1.0): -(1-e) log s(b d) - e log s(-b d)."""
    import preference
    chosen, rejected = torch.tensor([-5.0, -7.0]), torch.tensor([-6.0, -4.0])
    ref_chosen, ref_rejected = torch.tensor([-5.5, -6.0]), torch.tensor([-5.0, -5.0])
    losses, _, _ = preference.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.5, label_smoothing=0.2)
    delta = (chosen - ref_chosen) - (rejected - ref_rejected)
    expected = -0.8 * torch.log(torch.sigmoid(0.5 * delta)) - 0.2 * torch.log(torch.sigmoid(-0.5 * delta))
    torch.testing.assert_close(losses, expected)


def test_orpo_loss_and_rewards_equal_trl(glm3):
    import preference
    from model import MODE

    base, tokenizer = glm3
    batch = pair_batch(tokenizer, "glm3", PAIRS, 3)
    policy = perturbed(MODE["glm3"].model.from_pretrained(base), seed=2).eval()
    objective = preference.PreferenceObjective(SimpleNamespace(stage="orpo", pref_beta=0.25, pref_label_smoothing=0.0,
                                                               train_type="lora", ref_model_path=None))
    loss_sum, stats = objective.loss(Engine(module=policy, device=torch.device("cpu")), batch)
    theirs, chosen_rewards, rejected_rewards = trl_orpo(policy, batch, beta=0.25)
    assert (loss_sum / 3).item() == pytest.approx(theirs.item(), rel=FP32_RTOL)
    described = objective.describe(stats.tolist(), 3)
    assert described["rewards/chosen"] == pytest.approx(chosen_rewards.mean().item(), rel=FP32_RTOL)
    assert described["rewards/rejected"] == pytest.approx(rejected_rewards.mean().item(), rel=FP32_RTOL)


def read_records(output_dir):
    return [json.loads(line) for line in Path(output_dir, "train_log.jsonl").read_text().splitlines()]


def unknown_relation_pairs(source: str, directory) -> Path:
    """Pairs whose rejected answer names no relation ("未知" in its place): a preference a tiny model can learn
    from 24 pairs and carry over to the held-out prompts."""
    path = Path(directory) / f"unknown-{source}"
    with open(path, "w", encoding="utf-8") as f:
        for line in (ROOT / "data" / source).read_text(encoding="utf-8").splitlines():
            sample = json.loads(line)
            rejected = "\n".join(f"{t.split('_')[0]}_未知_{t.split('_')[-1]}" for t in sample["output"].split("\n"))
            f.write(json.dumps({"instruction": sample["instruction"], "input": sample["input"],
                                "chosen": sample["output"], "rejected": rejected}, ensure_ascii=False) + "\n")
    return path


def test_dpo_lora_through_train_py_logs_what_trl_computes_and_learns_the_preference(glm3, tmp_path,
                                                                                    train_in_process):
    """train.py --stage dpo --train_type lora: the dev metrics it logs after its steps are TRL's on the adapter it
    saved (reference: the base, the adapter switched off), and the held-out pairs end up all preferred the right
    way round (rewards/accuracy 1.0), while the reference stays the base."""
    from peft import PeftModel

    import train
    from model import MODE

    base, tokenizer = glm3
    out = tmp_path / "dpo"
    train_path, dev_path = unknown_relation_pairs("train.jsonl", tmp_path), unknown_relation_pairs("dev.jsonl", tmp_path)
    train_in_process("--stage", "dpo", "--pref_beta", "0.5", "--mode", "glm3", "--model_name_or_path", base,
                     "--train_path", train_path, "--dev_path", dev_path, "--train_type", "lora", "--lora_dropout", "0",
                     "--max_len", "256", "--max_src_len", "200", "--per_device_train_batch_size", "4",
                     "--learning_rate", "2e-2", "--warmup_ratio", "0", "--num_train_epochs", "4",
                     "--show_loss_step", "1", "--output_dir", out)
    records = read_records(out)
    first, last_eval = records[0], [r for r in records if "eval_loss" in r][-1]
    assert first["loss"] == pytest.approx(0.6931471805599453, rel=1e-6)  # step 1: the policy is the reference
    assert last_eval["eval_rewards/accuracy"] == 1.0, last_eval

    checkpoint = out / train.last_checkpoint(str(out))
    model = PeftModel.from_pretrained(MODE["glm3"].model.from_pretrained(base), str(checkpoint)).eval()
    batch = pair_batch(tokenizer, "glm3", dev_path, 6)
    with torch.no_grad(), model.disable_adapter():
        import preference
        ref_logps, _ = preference.sequence_logps(model(input_ids=batch["input_ids"], return_logits=True).logits,
                                                 batch["labels"])
    with torch.no_grad():
        theirs, metrics = trl_dpo(model, batch, *ref_logps.chunk(2), beta=0.5)
    assert last_eval["eval_loss"] == pytest.approx(theirs.item(), rel=1e-4)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert last_eval[f"eval_{name}"] == pytest.approx(metrics[name], rel=1e-4, abs=1e-5), name


def test_dpo_full_training_keeps_its_reference_in_the_checkpoint(glm3, tmp_path, train_in_process, caplog):
    """freeze / all: the reference log-probabilities are computed once, before the first step, and a resumed run
    reads them from the checkpoint instead of scoring the (by then trained) weights."""
    import preference

    base, _ = glm3
    out = tmp_path / "dpo-freeze"
    argv = ["--stage", "dpo", "--mode", "glm3", "--model_name_or_path", base, "--train_path", PAIRS,
            "--dev_path", DEV_PAIRS, "--train_type", "freeze", "--max_len", "256", "--max_src_len", "200",
            "--per_device_train_batch_size", "8", "--learning_rate", "1e-2", "--show_loss_step", "1",
            "--output_dir", out]
    computed = []
    real_forward = preference.forward_logps

    def counting(engine, batch):
        computed.append(engine.module.training)
        return real_forward(engine, batch)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(preference, "forward_logps", counting)
        train_in_process(*argv, "--num_train_epochs", "1")
        before_training = len([t for t in computed if not t])
        computed.clear()
        train_in_process(*argv, "--num_train_epochs", "2", "--resume")
    state = torch.load(next((out / "epoch-1-step-3" / "deepspeed" / "state").glob("mp_rank_00_model_states.pt")),
                       weights_only=False)
    assert state["reference_logps"]["train"].shape == (24, 2) and state["reference_logps"]["dev"].shape == (6, 2)
    assert before_training >= 1 + 4  # the reference pass (train: 3 batches, dev: 1) and the evaluations
    # resumed: the policy's steps (3, in train mode) and its evaluations, no reference pass over the training set
    assert computed.count(True) == 3 and computed.count(False) == 1, computed
    first, second = (r for r in read_records(out) if "eval_loss" in r)
    assert first["eval_rewards/chosen"] != 0 and second["eval_rewards/margins"] > first["eval_rewards/margins"]


@pytest.mark.parametrize("row, message", [
    ({"instruction": "q", "chosen": "a"}, "needs 'rejected'"),
    ({"instruction": "q", "chosen": "a", "rejected": "a"}, "the same answer"),
    ({"instruction": "q", "chosen": "", "rejected": ""}, "both empty"),
    ({"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}], "chosen": "a",
      "rejected": "b"}, "must end with a user"),
])
def test_bad_pairs_name_file_and_line(row, message, glm3, tmp_path):
    import preference
    from dataset import DataError

    base, tokenizer = glm3
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"instruction": "q", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=rf"{path}:2: .*{message}"):
        preference.PreferenceDataset(str(path), tokenizer, "glm3", 256, 200)


@pytest.mark.parametrize("mode", ["glm", "glm2", "glm3", "glm4"])
def test_every_mode_builds_the_example_pairs_on_one_prompt(mode, tiny_dirs):
    """data/pairs_train.jsonl through each mode's template: both rows start with the same prompt tokens, which
    carry no label, and each answer's labels start right after them (with its end token, as in SFT)."""
    import preference
    from model import MODE, template

    tokenizer = MODE[mode].tokenizer.from_pretrained(tiny_dirs[mode])
    data = preference.PreferenceDataset(str(PAIRS), tokenizer, mode, 256, 200)
    assert len(data) == 24
    for example in data.examples[:3]:
        starts = [next(i for i, label in enumerate(example[k]) if label != template.IGNORE_INDEX)
                  for k in ("labels", "rejected_labels")]
        assert starts[0] == starts[1]
        assert example["input_ids"][:starts[0]] == example["rejected_input_ids"][:starts[0]]
        assert example["input_ids"] != example["rejected_input_ids"]


def test_a_tool_call_can_be_the_chosen_answer(tiny_dirs):
    """glm4: chosen calls the declared tool (our `metadata` form), rejected answers in text; the call is built as
    training builds calls."""
    import preference
    from model import MODE, template

    tokenizer = MODE["glm4"].tokenizer.from_pretrained(tiny_dirs["glm4"])
    conversation = json.loads((ROOT / "data" / "tools_train.jsonl").read_text(encoding="utf-8").splitlines()[0])
    prompt_turns = conversation["conversations"][:2]
    call = conversation["conversations"][2]
    prompt, chosen, rejected = preference.pair_messages(
        "glm4", {"conversations": prompt_turns, "chosen": call, "rejected": "我无法读取故障码。"}, "x:1")
    example, _ = preference.PreferenceDataset._encode(tokenizer, "glm4", prompt, chosen, rejected, 2048, 1900)
    sft_ids, sft_labels, _ = template.encode_messages(tokenizer, "glm4", prompt + chosen, learn_all_turns=False)
    assert (example["input_ids"], example["labels"]) == (sft_ids, sft_labels)
    assert "read_fault_codes" in tokenizer.decode([t for t in example["labels"] if t != template.IGNORE_INDEX])


def test_the_two_answers_share_one_prompt_and_only_answers_are_learned(glm3):
    """A conversation pair: the prompt (system, earlier turns) is the same tokens in both rows, labels start where
    the answers start, and a pair whose answer cannot fit is left out whole rather than cut."""
    import preference
    from model import template

    base, tokenizer = glm3
    conversation = [{"role": "system", "content": "你是汽车维修助手。"}, {"role": "user", "content": "发动机抖动"},
                    {"role": "assistant", "content": "请描述症状"}, {"role": "user", "content": "冷车时抖"}]
    prompt, chosen, rejected = preference.pair_messages(
        "glm3", {"conversations": conversation, "chosen": "检查火花塞", "rejected": "不知道"}, "x:1")
    example, _ = preference.PreferenceDataset._encode(tokenizer, "glm3", prompt, chosen, rejected, 256, 200)
    prompt_ids = template.encode_context(tokenizer, "glm3", prompt)
    for prefix in ("", "rejected_"):
        ids, labels = example[prefix + "input_ids"], example[prefix + "labels"]
        assert ids[:len(prompt_ids)] == prompt_ids
        assert all(label == -100 for label in labels[:len(prompt_ids)])
        assert all(label != -100 for label in labels[len(prompt_ids):])
    assert preference.PreferenceDataset._encode(tokenizer, "glm3", prompt, chosen,
                                                [{"role": "assistant", "content": "很长" * 200}], 256, 200) == (None,
                                                                                                              True)


@pytest.mark.parametrize("flags, message", [
    (["--packing"], "--packing with --stage dpo"),
    (["--pref_beta", "0"], "--pref_beta must be above 0"),
])
def test_refused_flags_say_why_in_one_line(flags, message, glm3, tmp_path, capsys):
    import train
    base, _ = glm3
    with pytest.raises(SystemExit):
        train.parse_args([str(a) for a in ("--stage", "dpo", "--mode", "glm3", "--model_name_or_path", base,
                                           "--train_path", PAIRS, "--output_dir", tmp_path, *flags)])
    assert message in capsys.readouterr().err


def test_the_ptuning_reference_is_the_model_without_its_prefix(glm3):
    """DPO's reference for --train_type ptuning: the same model with the prefix switched off, which computes what
    the base computes (and the prefix, while on, changes the logits)."""
    import preference
    from model import MODE

    base, tokenizer = glm3
    ids = pair_batch(tokenizer, "glm3", PAIRS, 2)["input_ids"]
    plain = MODE["glm3"].model.from_pretrained(base).eval()
    prefixed = MODE["glm3"].model.from_pretrained(base, pre_seq_len=4, prefix_projection=False).eval()
    with torch.no_grad():
        torch.nn.init.normal_(prefixed.transformer.prefix_encoder.embedding.weight, std=1.0)
        expected = plain(input_ids=ids, return_logits=True).logits
        assert not torch.allclose(prefixed(input_ids=ids, return_logits=True).logits, expected, atol=1e-4)
        with preference.adapter_off(prefixed):
            switched_off = prefixed(input_ids=ids, return_logits=True).logits
        torch.testing.assert_close(switched_off, expected)
        assert not torch.allclose(prefixed(input_ids=ids, return_logits=True).logits, expected, atol=1e-4)


def test_orpo_lora_through_train_py_logs_what_trl_computes(glm3, tmp_path, train_in_process):
    """train.py --stage orpo: the dev loss and rewards it logs after a step are TRL's odds-ratio term plus the
    chosen answer's NLL on the adapter it saved."""
    from peft import PeftModel

    import train
    from model import MODE

    base, tokenizer = glm3
    out = tmp_path / "orpo"
    train_in_process("--stage", "orpo", "--pref_beta", "0.25", "--mode", "glm3", "--model_name_or_path", base,
                     "--train_path", PAIRS, "--dev_path", DEV_PAIRS, "--train_type", "lora", "--lora_dropout", "0",
                     "--max_len", "256", "--max_src_len", "200", "--per_device_train_batch_size", "8",
                     "--learning_rate", "2e-2", "--max_steps", "2", "--output_dir", out)
    last_eval = [r for r in read_records(out) if "eval_loss" in r][-1]
    model = PeftModel.from_pretrained(MODE["glm3"].model.from_pretrained(base),
                                      str(out / train.last_checkpoint(str(out)))).eval()
    with torch.no_grad():
        theirs, chosen_rewards, rejected_rewards = trl_orpo(model, pair_batch(tokenizer, "glm3", DEV_PAIRS, 6),
                                                            beta=0.25)
    assert last_eval["eval_loss"] == pytest.approx(theirs.item(), rel=1e-4)
    assert last_eval["eval_rewards/chosen"] == pytest.approx(chosen_rewards.mean().item(), rel=1e-4)
    assert last_eval["eval_rewards/rejected"] == pytest.approx(rejected_rewards.mean().item(), rel=1e-4)


def test_ref_model_path_is_the_reference_of_the_first_step(glm3, tmp_path, train_in_process):
    """--ref_model_path: the first step's loss (policy: the base with a fresh LoRA adapter, i.e. the base) is TRL's
    DPO loss against that other model's log-probabilities, no longer log 2."""
    from model import MODE

    base, tokenizer = glm3
    reference_dir = tmp_path / "reference"
    reference = perturbed(MODE["glm3"].model.from_pretrained(base), seed=3).eval()
    reference.save_pretrained(str(reference_dir))
    tokenizer.save_pretrained(str(reference_dir))
    out = tmp_path / "dpo-ref"
    train_in_process("--stage", "dpo", "--ref_model_path", reference_dir, "--mode", "glm3",
                     "--model_name_or_path", base, "--train_path", PAIRS, "--train_type", "lora",
                     "--max_len", "256", "--max_src_len", "200", "--per_device_train_batch_size", "24",
                     "--max_steps", "1", "--show_loss_step", "1", "--output_dir", out)
    first = read_records(out)[0]
    batch = pair_batch(tokenizer, "glm3", PAIRS, 24)
    import preference
    with torch.no_grad():
        ref_logps, _ = preference.sequence_logps(reference(input_ids=batch["input_ids"], return_logits=True).logits,
                                                 batch["labels"])
        theirs, _ = trl_dpo(MODE["glm3"].model.from_pretrained(base).eval(), batch, *ref_logps.chunk(2), beta=0.1)
    assert abs(theirs.item() - 0.6931) > 1e-3
    assert first["loss"] == pytest.approx(theirs.item(), rel=1e-5)


def test_an_empty_share_of_the_last_batch_is_one_padding_pair(glm3):
    """dataset.EpochBatches gives a rank without a sample of the epoch's last batch an empty micro-batch: the pair
    collator makes it one pair of padding, not counted (units 0) and adding nothing to the loss."""
    import preference
    from model import MODE

    base, tokenizer = glm3
    batch = preference.PairCollator(tokenizer.pad_token_id)([])
    assert batch["input_ids"].shape == (2, 1) and preference.PreferenceObjective.units(batch) == 0
    model = MODE["glm3"].model.from_pretrained(base)
    objective = preference.PreferenceObjective(SimpleNamespace(stage="orpo", pref_beta=0.1, pref_label_smoothing=0.0,
                                                               train_type="lora", ref_model_path=None))
    loss_sum, stats = objective.loss(Engine(module=model, device=torch.device("cpu")), batch)
    assert loss_sum.item() == 0 and not stats.any()
    loss_sum.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_dpo_on_glm4_0414_learns_the_answers_of_its_own_chat_template(tmp_path, train_in_process):
    """glm4-0414 (transformers' Glm4ForCausalLM, the checkpoint's chat template): each answer of a pair is labelled
    exactly as supervised training labels that conversation, and DPO through train.py starts at log 2 (the
    reference is the model with its LoRA adapter off) and logs the dev metrics."""
    import preference
    from model import template
    from model.glm4_0414 import write_tiny_checkpoint
    from transformers import AutoTokenizer

    base = write_tiny_checkpoint(str(tmp_path / "glm4-0414"))
    tokenizer = AutoTokenizer.from_pretrained(base)
    prompt, chosen, rejected = preference.pair_messages(
        "glm4-0414", json.loads(PAIRS.read_text(encoding="utf-8").splitlines()[0]), "x:1")
    example, _ = preference.PreferenceDataset._encode(tokenizer, "glm4-0414", prompt, chosen, rejected, 256, 200)
    for prefix, answer in (("", chosen), ("rejected_", rejected)):
        ids, labels, _ = template.encode_messages(tokenizer, "glm4-0414", prompt + answer, learn_all_turns=False)
        assert (example[prefix + "input_ids"], example[prefix + "labels"]) == (ids, labels)
    out = tmp_path / "dpo"
    train_in_process("--stage", "dpo", "--model_name_or_path", base, "--train_path", PAIRS, "--dev_path", DEV_PAIRS,
                     "--train_type", "lora", "--max_len", "256", "--max_src_len", "200",
                     "--per_device_train_batch_size", "8", "--max_steps", "2", "--show_loss_step", "1",
                     "--output_dir", out)
    records = read_records(out)
    assert records[0]["loss"] == pytest.approx(0.6931471805599453, rel=1e-6)
    assert {"eval_rewards/accuracy", "eval_logps/chosen"} <= set(records[-1])
