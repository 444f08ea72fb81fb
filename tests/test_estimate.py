"""estimate: the figures against torch's own accounting (tensor bytes after one Adam step, the
KV cache of a real forward pass) for tiny GPT-2 and Llama models saved by transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run, tied_module


def nbytes(tensors) -> int:
    return sum(t.nelement() * t.element_size() for t in tensors)


def cache_bytes(cache) -> int:
    """Bytes of every key and value tensor a transformers cache holds."""
    return sum(nbytes([layer.keys, layer.values]) for layer in cache.layers)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=3, n_head=4, n_embd=48, vocab_size=120, n_positions=96, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    path = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """Grouped-query attention (2 KV heads for 8 heads), an explicit head_dim and bf16 weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        hidden_size=64,
        head_dim=16,
        intermediate_size=96,
        vocab_size=128,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    return model, path


def estimate(*args: str) -> dict:
    result = run("estimate", *args, "--format", "json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_weights_and_adam_state_match_torch_after_one_step(gpt2):
    model, path = gpt2
    got = estimate(str(path / "model.safetensors"))
    params = list(model.parameters())  # a tied pair (wte, lm_head) is one parameter
    assert got["parameters"] == sum(p.numel() for p in params)
    assert got["weights"]["stored"] == got["weights"]["float32"] == nbytes(params)
    assert got["weights"]["bfloat16"] == nbytes([p.to(torch.bfloat16) for p in params])
    assert got["weights"]["int8"] == nbytes([p.to(torch.int8) for p in params])
    assert got["weights"]["int4"] == (got["parameters"] + 1) // 2

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 120, (2, 16))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    state = [s for p in params for k, s in optimizer.state[p].items() if k in ("exp_avg", "exp_avg_sq")]
    fp32 = got["train_adam_fp32"]
    assert fp32["weights"] == nbytes(params)
    assert fp32["gradients"] == nbytes([p.grad for p in params])
    assert fp32["adam_moments"] == nbytes(state)
    assert fp32["total"] == nbytes(params) + nbytes([p.grad for p in params]) + nbytes(state)
    optimizer.zero_grad()


def test_mixed_precision_state_matches_torch(llama):
    """bf16 weights and gradients, an fp32 master copy that Adam steps on, as mixed precision runs."""
    model, path = llama
    got = estimate(str(path))
    params = list(model.parameters())
    ids = torch.randint(0, 128, (2, 8))
    model(ids, labels=ids).loss.backward()
    master = [p.detach().float().clone().requires_grad_() for p in params]
    for m, p in zip(master, params):
        m.grad = p.grad.float()
    optimizer = torch.optim.Adam(master)
    optimizer.step()
    moments = [s for m in master for k, s in optimizer.state[m].items() if k in ("exp_avg", "exp_avg_sq")]
    mixed = got["train_adam_mixed"]
    assert got["dtype"] == "bfloat16"
    assert got["weights"]["stored"] == nbytes(params)
    assert mixed["weights"] == nbytes(params)
    assert mixed["gradients"] == nbytes([p.grad for p in params])
    assert mixed["master_weights"] == nbytes(master)
    assert mixed["adam_moments"] == nbytes(moments)
    assert mixed["total"] == nbytes(params) + nbytes([p.grad for p in params]) + nbytes(master) + nbytes(moments)
    model.zero_grad()


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_kv_cache_matches_a_real_forward(which, gpt2, llama):
    model, path = {"gpt2": gpt2, "llama": llama}[which]
    batch, context = 3, 20
    with torch.no_grad():
        out = model(torch.randint(0, 100, (batch, context)), use_cache=True)
    measured = cache_bytes(out.past_key_values)
    got = estimate(str(path / "model.safetensors"), "--context", str(context), "--batch", str(batch))
    kv = got["kv_cache"]
    assert kv["bytes"] == measured
    assert kv["bytes_per_token"] * context * batch == measured
    if which == "llama":
        assert (kv["layers"], kv["kv_heads"], kv["head_dim"], kv["dtype"]) == (2, 2, 16, "bfloat16")
    else:
        assert (kv["layers"], kv["kv_heads"], kv["head_dim"], kv["dtype"]) == (3, 4, 12, "float32")


def test_default_context_table_and_config_option(gpt2, tmp_path):
    _, path = gpt2
    got = estimate(str(path / "model.safetensors"))
    assert got["kv_cache"]["context"] == 96 and got["kv_cache"]["batch"] == 1  # n_positions
    # a checkpoint elsewhere: no KV cache unless --config names the config
    import shutil

    shutil.copy(path / "model.safetensors", tmp_path / "m.safetensors")
    assert "kv_cache" not in estimate(str(tmp_path / "m.safetensors"))
    with_config = estimate(str(tmp_path / "m.safetensors"), "--config", str(path / "config.json"))
    assert with_config["kv_cache"]["bytes_per_token"] == 2 * 3 * 4 * 12 * 4
    table = run("estimate", str(tmp_path / "m.safetensors"), "--format", "tsv").output.splitlines()
    p = got["parameters"]
    assert table[0] == f"weights as stored (float32)\t{4 * p}"
    assert table[-1] == f"train, Adam, mixed precision (+ fp32 master)\t{16 * p}"
    assert len(table) == 8


def test_bad_config(tmp_path, gpt2):
    _, path = gpt2
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "x"}))
    result = run("estimate", str(path / "model.safetensors"), "--config", str(tmp_path / "config.json"))
    assert result.exit_code == 2 and "names no layer or head count" in result.output
    (tmp_path / "config.json").write_text("{not json")
    result = run("estimate", str(path / "model.safetensors"), "--config", str(tmp_path / "config.json"))
    assert result.exit_code == 2 and "not a JSON config" in result.output


def test_training_checkpoint_counts_the_model_only(tmp_path):
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    path = Path(tmp_path / "train.pt")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 1}, path)
    got = estimate(str(path))
    assert got["parameters"] == 15 and got["weights"]["stored"] == 60


def test_a_tie_counts_once(tmp_path):
    """save_model stores a tied pair once plus a declared alias; torch.save shares one storage."""
    from safetensors.torch import save_model

    model = tied_module()
    save_model(model, str(tmp_path / "tied.safetensors"))
    torch.save(model.state_dict(), tmp_path / "tied.pt")
    for name in ("tied.safetensors", "tied.pt"):
        got = estimate(str(tmp_path / name))
        assert got["parameters"] == sum(p.numel() for p in model.parameters()) == 40
        assert got["train_adam_fp32"]["total"] == 16 * 40
