"""Model-layer behaviour on tiny checkpoints: loading and saving with official names, the KV cache, the loss, the
prefix, gradient checkpointing, dtypes, chat prompts, and clear errors on bad checkpoint directories."""
import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from model import MODE, template
from model.compat import enable_activation_checkpointing

MODES = ("glm", "glm2", "glm3", "glm4")


def load(mode, path, **kwargs):
    return MODE[mode].model.from_pretrained(path, dtype=torch.float32, **kwargs).eval(), \
        MODE[mode].tokenizer.from_pretrained(path)


def sample_ids(mode, tokenizer, text="发动机水温高，风扇低速转动。"):
    return torch.tensor([template.encode_prompt(tokenizer, mode, text)])


OFFICIAL_KEYS = {
    "glm": ["transformer.word_embeddings.weight", "transformer.layers.0.input_layernorm.weight",
            "transformer.layers.0.attention.query_key_value.weight", "transformer.layers.0.attention.dense.bias",
            "transformer.layers.1.mlp.dense_h_to_4h.weight", "transformer.layers.1.mlp.dense_4h_to_h.bias",
            "transformer.final_layernorm.weight", "lm_head.weight"],
    "glm2": ["transformer.embedding.word_embeddings.weight",
             "transformer.encoder.layers.0.self_attention.query_key_value.weight",
             "transformer.encoder.layers.0.self_attention.query_key_value.bias",
             "transformer.encoder.layers.0.self_attention.dense.weight",
             "transformer.encoder.layers.1.mlp.dense_h_to_4h.weight",
             "transformer.encoder.layers.1.mlp.dense_4h_to_h.weight",
             "transformer.encoder.final_layernorm.weight", "transformer.output_layer.weight"],
}
OFFICIAL_KEYS["glm3"] = OFFICIAL_KEYS["glm4"] = OFFICIAL_KEYS["glm2"]


@pytest.mark.parametrize("mode", MODES)
def test_save_load_round_trip_keeps_official_names(mode, tiny_dirs, tmp_path):
    model, tokenizer = load(mode, tiny_dirs[mode])
    ids = sample_ids(mode, tokenizer)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    saved = set(load_file(os.path.join(tmp_path, "model.safetensors")))
    # transformers' save_pretrained writes a tied weight once (ChatGLM-6B's lm_head is its word_embeddings)
    assert set(OFFICIAL_KEYS[mode]) - set(model.all_tied_weights_keys) <= saved
    assert all(k.startswith(("transformer.", "lm_head.")) for k in saved)
    assert not any("inv_freq" in k for k in saved)
    again, _ = load(mode, tmp_path)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pre_seq_len", [None, 4])
def test_generate_with_cache_equals_recomputation(mode, pre_seq_len, tiny_dirs):
    kwargs = {"pre_seq_len": pre_seq_len, "prefix_projection": True} if pre_seq_len else {}
    if mode == "glm" and not pre_seq_len:
        # the tiny ChatGLM-6B ties its head to the embedding (as THUDM's), and greedy decoding of random tied weights
        # settles on one token at once; an untied head of its own gives an answer that exercises the cache
        kwargs["tie_word_embeddings"] = False
    model, tokenizer = load(mode, tiny_dirs[mode], **kwargs)
    if "tie_word_embeddings" in kwargs:
        with torch.no_grad():
            model.lm_head.weight.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(1))
    if pre_seq_len:  # a prefix that matters
        torch.manual_seed(1)
        for p in model.transformer.prefix_encoder.parameters():
            torch.nn.init.normal_(p, std=0.5)
    ids = sample_ids(mode, tokenizer)
    with torch.no_grad():
        cached = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                do_sample=False, eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
        sequence = ids
        for _ in range(12):  # no cache: the whole sequence again at every step
            logits = model(sequence, use_cache=False).logits[:, -1]
            sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=1)
    assert cached.tolist() == sequence.tolist()
    assert len(set(sequence[0, ids.shape[1]:].tolist())) > 1  # not a degenerate constant answer


@pytest.mark.newest
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pre_seq_len", [None, 4])
def test_generate_feeds_one_new_token_and_a_growing_cache(mode, pre_seq_len, tiny_dirs):
    """Inside generate(), after the prompt, every forward call gets one new token per row and the cache of all
    tokens so far (prefix included). A model that silently ignores the cache (e.g. a renamed argument swallowed by
    **kwargs) leaves the cache empty and fails here, even where its recomputed answers would still be right."""
    kwargs = {"pre_seq_len": pre_seq_len, "prefix_projection": False} if pre_seq_len else {}
    model, tokenizer = load(mode, tiny_dirs[mode], **kwargs)
    prompts = [template.encode_prompt(tokenizer, mode, q) for q in ("你好", "发动机水温高，风扇低速转动。")]
    batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt")  # left padding
    assert (batch["attention_mask"] == 0).any()
    calls = []

    def record(module, args, call_kwargs):
        cache = call_kwargs.get("cache", call_kwargs.get("past_key_values"))
        calls.append((tuple(call_kwargs["input_ids"].shape), cache.get_seq_length() if cache is not None else 0))

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            model.generate(**batch, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id)
    finally:
        handle.remove()
    rows, prompt_len = batch["input_ids"].shape
    prefix = pre_seq_len or 0
    assert calls[0] == ((rows, prompt_len), 0)
    assert calls[1:] == [((rows, 1), prefix + prompt_len + step) for step in range(4)]


@pytest.mark.parametrize("mode", MODES)
def test_labels_loss_equals_hand_computed_cross_entropy(mode, tiny_dirs):
    model, tokenizer = load(mode, tiny_dirs[mode])
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "发动机_部件故障_水温高"}]
    ids, labels, _ = template.encode_messages(tokenizer, mode, messages)
    ids, labels = torch.tensor([ids]), torch.tensor([labels])
    with torch.no_grad():
        out = model(ids, labels=labels, return_logits=True)
        logits = model(ids).logits
    shifted_logits, shifted_labels = logits[0, :-1], labels[0, 1:]
    keep = shifted_labels != -100
    by_hand = -torch.log_softmax(shifted_logits[keep].double(), -1).gather(1, shifted_labels[keep, None]).mean()
    assert abs(out.loss.item() - by_hand.item()) < 1e-5
    assert torch.allclose(out.logits, logits)
    assert abs(F.cross_entropy(shifted_logits, shifted_labels).item() - by_hand.item()) < 1e-5


@pytest.mark.parametrize("mode", MODES)
def test_chunked_loss_gradients_equal_plain_cross_entropy(mode, tiny_dirs):
    """The memory-light loss (logits of labelled rows only, recomputed in backward) against plain F.cross_entropy
    over full logits: same loss and same gradients."""
    model, _ = load(mode, tiny_dirs[mode])
    torch.manual_seed(0)
    ids = torch.randint(5, 200, (2, 24))
    labels = ids.clone()
    labels[:, :10] = -100
    labels[1, 20:] = -100
    model.output_head.weight.data.normal_(std=0.5)
    loss = model(ids, labels=labels).loss
    loss.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    logits = model(ids).logits
    plain = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    plain.backward()
    assert abs(loss.item() - plain.item()) < 1e-5
    for name, grad in fused.items():
        expected = dict(model.named_parameters())[name].grad
        assert (grad - expected).abs().max() <= 1e-5 * expected.abs().max() + 1e-8, name


@pytest.mark.parametrize("mode", MODES)
def test_gradient_checkpointing_gives_the_same_gradients(mode, tiny_dirs):
    model, tokenizer = load(mode, tiny_dirs[mode], pre_seq_len=3)
    model.train()
    for name, p in model.named_parameters():  # P-Tuning: only the prefix trains, the base is frozen
        p.requires_grad = "prefix_encoder" in name
    ids = torch.randint(5, 200, (2, 16))

    def grads():
        torch.manual_seed(0)  # same prefix dropout
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return model.transformer.prefix_encoder.embedding.weight.grad.clone()

    plain = grads()
    enable_activation_checkpointing(model)
    checkpointed = grads()
    assert plain.abs().sum() > 0
    assert torch.allclose(plain, checkpointed, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_backward(mode, dtype, tiny_dirs):
    model = MODE[mode].model.from_pretrained(tiny_dirs[mode], dtype=dtype, pre_seq_len=4, prefix_projection=True)
    model.transformer.prefix_encoder.embedding.weight.data.fill_(300.0)  # large prefix values: fp16 overflow trap
    ids = torch.randint(5, 200, (2, 12))
    reference = MODE[mode].model.from_pretrained(tiny_dirs[mode], dtype=torch.float32, pre_seq_len=4,
                                                 prefix_projection=True)
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    model.eval(), reference.eval()
    loss = model(ids, labels=ids).loss
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(model.transformer.prefix_encoder.trans[0].weight.grad.float()).all()
    with torch.no_grad():
        assert abs(loss.item() - reference(ids, labels=ids).loss.item()) < 0.05


def test_chat_prompts_follow_the_official_formats(tiny_dirs):
    tokenizers = {m: MODE[m].tokenizer.from_pretrained(tiny_dirs[m]) for m in ("glm", "glm2", "glm3")}
    glm, glm2, glm3 = tokenizers["glm"], tokenizers["glm2"], tokenizers["glm3"]
    g = template.special
    # glm: the raw query without history; rounds from 0 with it; then [gMASK] <sop>
    assert template.encode_prompt(glm, "glm", "你好") == glm.encode_text("你好") + [g(glm, "[gMASK]"), g(glm, "sop")]
    with_history = template.encode_prompt(glm, "glm", "再见", history=[("你好", "你好！")])
    assert with_history == glm.encode_text("[Round 0]\n问：你好\n答：你好！\n[Round 1]\n问：再见\n答：") + \
        [g(glm, "[gMASK]"), g(glm, "sop")]
    # glm2: [gMASK] sop, rounds from 1
    assert template.encode_prompt(glm2, "glm2", "你好") == [g(glm2, "[gMASK]"), g(glm2, "sop")] + \
        glm2.encode_text("[Round 1]\n\n问：你好\n\n答：")
    assert template.encode_prompt(glm2, "glm2", "再见", history=[("你好", "你好！")]) == \
        [g(glm2, "[gMASK]"), g(glm2, "sop")] + glm2.encode_text("[Round 1]\n\n问：你好\n\n答：你好！\n\n[Round 2]\n\n问：再见\n\n答：")
    # glm3: role tokens, "\n" after the role, ends with <|assistant|>
    history = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]
    expected = [g(glm3, "[gMASK]"), g(glm3, "sop"),
                g(glm3, "<|user|>")] + glm3.encode_text("\n") + glm3.encode_text("你好") + \
               [g(glm3, "<|assistant|>")] + glm3.encode_text("\n") + glm3.encode_text("你好！") + \
               [g(glm3, "<|user|>")] + glm3.encode_text("\n") + glm3.encode_text("再见") + [g(glm3, "<|assistant|>")]
    assert template.encode_prompt(glm3, "glm3", "再见", history=history) == expected
    assert g(glm3, "<|user|>") == g(glm3, "sop") + 3  # the official layout: roles follow eop


@pytest.mark.parametrize("mode", MODES)
def test_chat_and_stream_chat(mode, tiny_dirs, caplog):
    import transformers

    model, tokenizer = load(mode, tiny_dirs[mode])
    transformers.logging.enable_propagation()  # transformers' own handler writes to the stderr of import time
    try:
        response, history = model.chat(tokenizer, "你好", do_sample=False, max_new_tokens=8)
        streamed = list(model.stream_chat(tokenizer, "你好", do_sample=False, max_new_tokens=8))
    finally:
        transformers.logging.disable_propagation()
    assert streamed[-1][0] == response
    # max_new_tokens replaces the default max_length: transformers warns on every answer when both are set
    assert not [record for record in caplog.records if "seem to have been set" in record.getMessage()]
    if mode in ("glm3", "glm4"):
        assert history[0] == {"role": "user", "content": "你好"} and history[-1]["role"] == "assistant"
    else:
        assert history == [("你好", response)]


# ---------------------------------------------------------------------------------------------------------------
# bad checkpoint directories: one clear line, never a silent random initialisation
# ---------------------------------------------------------------------------------------------------------------
def test_not_a_checkpoint_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        MODE["glm3"].model.from_pretrained(tmp_path)


def test_other_version_than_mode(tiny_dirs):
    with pytest.raises(ValueError, match="glm2 checkpoint, but --mode is glm"):
        MODE["glm"].model.from_pretrained(tiny_dirs["glm2"])
    with pytest.raises(ValueError, match="glm checkpoint, but --mode is glm3"):
        MODE["glm3"].model.from_pretrained(tiny_dirs["glm"])


def test_official_config_without_our_marker_is_recognised(tiny_dirs, tmp_path):
    shutil.copytree(tiny_dirs["glm"], tmp_path / "ckpt")
    config_file = tmp_path / "ckpt" / "config.json"
    config = json.loads(config_file.read_text())
    del config["chatglm_version"]
    config_file.write_text(json.dumps(config))
    MODE["glm"].model.from_pretrained(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="glm checkpoint, but --mode is glm2"):
        MODE["glm2"].model.from_pretrained(tmp_path / "ckpt")


@pytest.mark.parametrize("change", ["drop", "rename"])
def test_missing_or_unexpected_weights(change, tiny_dirs, tmp_path):
    shutil.copytree(tiny_dirs["glm3"], tmp_path / "ckpt")
    weights_file = tmp_path / "ckpt" / "model.safetensors"
    weights = load_file(weights_file)
    key = "transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"
    value = weights.pop(key)
    if change == "rename":
        weights[key.replace("mlp", "mlp2")] = value
    save_file(weights, weights_file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing weights.*dense_4h_to_h" if change == "drop" else "unexpected"):
        MODE["glm3"].model.from_pretrained(tmp_path / "ckpt")


def test_missing_tokenizer_file(tiny_dirs, tmp_path):
    shutil.copytree(tiny_dirs["glm3"], tmp_path / "ckpt")
    os.remove(tmp_path / "ckpt" / "tokenizer.model")
    with pytest.raises(Exception, match="tokenizer.model"):
        MODE["glm3"].tokenizer.from_pretrained(tmp_path / "ckpt")


def test_no_weight_files(tiny_dirs, tmp_path):
    shutil.copytree(tiny_dirs["glm2"], tmp_path / "ckpt")
    os.remove(tmp_path / "ckpt" / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        MODE["glm2"].model.from_pretrained(tmp_path / "ckpt")


@pytest.mark.parametrize("name,mode,wrong", [("THUDM/chatglm2-6b", "glm2", "glm3"), ("THUDM/chatglm3-6b", "glm3", "glm2")])
def test_official_glm2_glm3_configs_are_told_apart(name, mode, wrong, tiny_dirs, tmp_path):
    """An official config.json (all its fields, auto_map included, no marker of ours) loads; its _name_or_path
    tells ChatGLM2 from ChatGLM3, which share the network."""
    shutil.copytree(tiny_dirs[mode], tmp_path / "ckpt")
    config_file = tmp_path / "ckpt" / "config.json"
    config = json.loads(config_file.read_text())
    del config["chatglm_version"]
    config.update({"_name_or_path": name, "architectures": ["ChatGLMModel"], "torch_dtype": "float16",
                   "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig"}, "original_rope": True,
                   "bias_dropout_fusion": True, "quantization_bit": 0, "some_future_field": 7})
    config_file.write_text(json.dumps(config))
    model = MODE[mode].model.from_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    assert model.config.some_future_field == 7  # unknown fields are kept
    with pytest.raises(ValueError, match=f"{mode} checkpoint, but --mode is {wrong}"):
        MODE[wrong].model.from_pretrained(tmp_path / "ckpt")


# GLM-4-9B-Chat's config.json as published (all its fields; no marker of ours), with the tiny sizes swapped in.
OFFICIAL_GLM4_CONFIG = {
    "_name_or_path": "THUDM/glm-4-9b-chat", "model_type": "chatglm", "architectures": ["ChatGLMModel"],
    "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig"}, "add_bias_linear": False,
    "add_qkv_bias": True, "apply_query_key_layer_scaling": True, "apply_residual_connection_post_layernorm": False,
    "attention_dropout": 0.0, "attention_softmax_in_fp32": True, "attn_implementation": "sdpa",
    "bias_dropout_fusion": True, "ffn_hidden_size": 13696, "fp32_residual_connection": False, "hidden_dropout": 0.0,
    "hidden_size": 4096, "kv_channels": 128, "layernorm_epsilon": 1.5625e-07, "multi_query_attention": True,
    "multi_query_group_num": 2, "num_attention_heads": 32, "num_hidden_layers": 40, "num_layers": 40,
    "rope_ratio": 500, "original_rope": True, "padded_vocab_size": 151552, "post_layer_norm": True, "rmsnorm": True,
    "seq_length": 131072, "use_cache": True, "torch_dtype": "bfloat16", "transformers_version": "4.44.0",
    "tie_word_embeddings": False, "eos_token_id": [151329, 151336, 151338], "pad_token_id": 151329,
}


def test_official_glm4_config_is_recognised(tiny_dirs, tmp_path):
    """The official config.json tells GLM-4 by its vocabulary, its eos list or its name (any one is enough); a
    checkpoint of another version given with --mode glm4, or the reverse, stops with one line."""
    from model import detect_version

    assert detect_version(OFFICIAL_GLM4_CONFIG) == "glm4"
    chatglm3_like = {**OFFICIAL_GLM4_CONFIG, "_name_or_path": "", "padded_vocab_size": 65024, "eos_token_id": 2,
                     "pad_token_id": 0}
    assert detect_version(chatglm3_like) == "glm2/3"  # rope_ratio alone (ChatGLM3-6B-32k has one) tells nothing
    for hint in ({"_name_or_path": "THUDM/glm-4-9b"}, {"padded_vocab_size": 151552},
                 {"eos_token_id": [151329, 151336, 151338]}):
        assert detect_version({**chatglm3_like, **hint}) == "glm4", hint
    shutil.copytree(tiny_dirs["glm4"], tmp_path / "ckpt")
    config_file = tmp_path / "ckpt" / "config.json"
    tiny = json.loads(config_file.read_text())
    sizes = {k: tiny[k] for k in ("ffn_hidden_size", "hidden_size", "kv_channels", "num_attention_heads",
                                  "num_layers", "padded_vocab_size", "seq_length", "eos_token_id", "pad_token_id")}
    config_file.write_text(json.dumps({**OFFICIAL_GLM4_CONFIG, **sizes, "num_hidden_layers": tiny["num_layers"]}))
    model = MODE["glm4"].model.from_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    assert (model.config.rope_ratio, model.config.layernorm_epsilon) == (500, 1.5625e-07)
    for mode in ("glm2", "glm3", "glm"):
        with pytest.raises(ValueError, match=f"ckpt/config.json: this is a glm4 checkpoint, but --mode is {mode}$"):
            MODE[mode].model.from_pretrained(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="this is a glm3 checkpoint, but --mode is glm4"):
        MODE["glm4"].model.from_pretrained(tiny_dirs["glm3"])
    # an official ChatGLM2/3 config without its name (glm2/3) is no GLM-4 either
    shutil.copytree(tiny_dirs["glm3"], tmp_path / "chatglm3")
    config_file = tmp_path / "chatglm3" / "config.json"
    config = json.loads(config_file.read_text())
    del config["chatglm_version"], config["_name_or_path"]
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="this is a glm2/3 checkpoint, but --mode is glm4"):
        MODE["glm4"].model.from_pretrained(tmp_path / "chatglm3")
