"""The fast training path, checked where a CPU can: the loss equals the plain path's, no [tokens, vocab] logits are
kept for backward, and an epoch's batches (random or length-grouped) see every sample once."""
import pytest
import torch
import torch.nn.functional as F
from transformers import GlmConfig, GlmForCausalLM

from model import MODE
from model.modeling_base import LMHead
from dataset import EpochBatches


def tiny_pair(dtype):
    torch.manual_seed(0)
    config = MODE["glm3"].config(padded_vocab_size=512, hidden_size=64, num_attention_heads=4, kv_channels=16,
                                 multi_query_group_num=2, ffn_hidden_size=128, num_layers=2)
    ours = MODE["glm3"].model(config)
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.2) if p.dim() > 1 else torch.nn.init.uniform_(p, 0.5, 1.5)
    peer = GlmForCausalLM(GlmConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                    partial_rotary_factor=0.5, attention_bias=True, rms_norm_eps=1e-5,
                                    pad_token_id=0))
    src = ours.state_dict()
    mapped = {"model.embed_tokens.weight": src["transformer.embedding.word_embeddings.weight"],
              "model.norm.weight": src["transformer.encoder.final_layernorm.weight"],
              "lm_head.weight": src["transformer.output_layer.weight"]}
    for i in range(2):
        a, b = f"model.layers.{i}.", f"transformer.encoder.layers.{i}."
        qkv_w, qkv_b = src[f"{b}self_attention.query_key_value.weight"], src[f"{b}self_attention.query_key_value.bias"]
        for name, rows in zip("qkv", (slice(0, 64), slice(64, 96), slice(96, 128))):
            mapped[f"{a}self_attn.{name}_proj.weight"], mapped[f"{a}self_attn.{name}_proj.bias"] = qkv_w[rows], qkv_b[rows]
        mapped[f"{a}self_attn.o_proj.weight"] = src[f"{b}self_attention.dense.weight"]
        mapped[f"{a}mlp.gate_up_proj.weight"] = src[f"{b}mlp.dense_h_to_4h.weight"]
        mapped[f"{a}mlp.down_proj.weight"] = src[f"{b}mlp.dense_4h_to_h.weight"]
        mapped[f"{a}input_layernorm.weight"] = src[f"{b}input_layernorm.weight"]
        mapped[f"{a}post_attention_layernorm.weight"] = src[f"{b}post_attention_layernorm.weight"]
    peer.load_state_dict(mapped)
    return ours.to(dtype), peer.to(dtype)


def test_fast_loss_equals_the_plain_path_in_bf16():
    ours, peer = tiny_pair(torch.bfloat16)
    ids = torch.randint(3, 512, (2, 64))
    labels = ids.clone()
    labels[:, :20] = -100  # prompt tokens
    with torch.no_grad():
        fast = ours(ids, labels=labels).loss.item()
        logits = ours(ids).logits.float()  # the plain path: all logits, then cross-entropy in fp32
        plain = F.cross_entropy(logits[:, :-1].reshape(-1, 512), labels[:, 1:].reshape(-1)).item()
        peer_loss = peer(input_ids=ids, labels=labels).loss.item()
    assert abs(fast - plain) < 1e-3 * plain
    assert abs(fast - peer_loss) < 2e-2 * peer_loss  # an independent implementation, bf16 rounding apart


def test_no_full_vocabulary_logits_are_kept_for_backward():
    head = LMHead(64, 4096, bias=False)
    hidden = torch.randn(3000, 64, requires_grad=True)
    targets = torch.randint(0, 4096, (3000,))
    saved = []

    def pack(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = head(hidden, targets=targets)
    largest = max(torch.Size(s).numel() for s in saved)
    assert largest <= max(hidden.numel(), head.weight.numel())  # inputs only, no [3000, 4096] logits
    loss.backward()
    # the same numbers as the plain computation
    reference_hidden = hidden.detach().clone().requires_grad_()
    reference = F.cross_entropy(reference_hidden @ head.weight.t(), targets, reduction="sum")
    reference.backward()
    assert abs(loss.item() - reference.item()) < 1e-3 * reference.item()
    assert torch.allclose(hidden.grad, reference_hidden.grad, atol=1e-5)


@pytest.mark.parametrize("group_by_length", [False, True])
def test_epoch_batches_see_every_sample_once_per_epoch(group_by_length):
    """203 samples on 2 ranks in micro-batches of 4: 26 micro-batches a rank, the last global batch (3 samples)
    shared 2 + 1; every sample once. --group_by_length wastes far less padding than random batches."""
    torch.manual_seed(0)
    lengths = torch.randint(5, 500, (203,)).tolist()
    batch, world = 4, 2
    for epoch in (0, 1):
        per_rank = []
        for rank in range(world):
            sampler = EpochBatches(lengths, batch, world, rank, seed=3, group_by_length=group_by_length, mega=5)
            sampler.set_epoch(epoch)
            per_rank.append(list(sampler))
            assert len(per_rank[-1]) == len(sampler) == 26
            assert [len(b) for b in per_rank[-1]] == [4] * 25 + [2 - rank]
        seen = [i for r in per_rank for b in r for i in b]
        assert sorted(seen) == list(range(203))
        if group_by_length:  # padding: grouped batches waste far less than random ones would
            padded = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for r in per_rank for b in r)
            order = torch.randperm(203, generator=torch.Generator().manual_seed(epoch)).tolist()
            random_padded = sum(max(lengths[i] for i in order[j:j + batch]) * len(order[j:j + batch])
                                - sum(lengths[i] for i in order[j:j + batch]) for j in range(0, len(order), batch))
            assert padded < 0.5 * random_padded
    first = EpochBatches(lengths, batch, world, 0, seed=3, group_by_length=group_by_length, mega=5)
    assert per_rank[0] != list(first)  # epoch changes order


def test_random_epoch_batches_keep_distributed_samplers_order():
    """Whole batches come in the order torch's DistributedSampler (drop_last) gave them before, so a checkpoint taken
    inside an epoch by the earlier code resumes on the same samples."""
    from torch.utils.data import DistributedSampler

    for rank in (0, 1):
        old = DistributedSampler(range(203), num_replicas=2, rank=rank, shuffle=True, seed=3, drop_last=True)
        old.set_epoch(1)
        new = EpochBatches([1] * 203, 4, 2, rank, seed=3)
        new.set_epoch(1)
        flat = list(old)
        assert list(new)[:25] == [flat[i:i + 4] for i in range(0, 100, 4)]


def test_checkpoint_every_n_layers_recomputes_only_those_layers(tiny_dirs):
    import train

    args = train.parse_args(["--model_name_or_path", "-", "--mode", "glm3", "--train_path", "-", "--output_dir", "-",
                             "--train_type", "lora", "--lora_module_name", "query_key_value",
                             "--gradient_checkpointing", "--checkpoint_every_n_layers", "2"])
    model = train.apply_train_type(MODE["glm3"].model.from_pretrained(tiny_dirs["glm3"]), args)
    layers = model.base_model.model.transformer.encoder.layers
    assert [layer.gradient_checkpointing for layer in layers] == [True, False]
    model.train()
    ids = torch.randint(5, 200, (2, 16))
    model(ids, labels=ids).loss.backward()  # a frozen base still back-propagates into LoRA through the checkpoint
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]  # (A's is 0 while B is 0)
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
