"""merge: every method against a reference written from mergekit's code, on real GPT-2 files
(transformers' save_pretrained), and LoRA folding against peft's merge_and_unload()."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run, tied_module
from safetensors.numpy import load_file

from paramctl.merge import trim

TOL = dict(rtol=1e-5, atol=1e-6)


def tiny_config():
    from transformers import GPT2Config

    return GPT2Config(
        n_layer=2, n_head=4, n_embd=32, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0, pad_token_id=0
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A base GPT-2 and three fine-tunes of it (base + small noise): two safetensors, one bf16 .pt."""
    from transformers import GPT2LMHeadModel

    root = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    base = GPT2LMHeadModel(tiny_config())
    base.save_pretrained(root / "base")
    out = {"base": root / "base" / "model.safetensors", "base_dir": root / "base"}
    for i, name in enumerate(["ft1", "ft2", "ft3"]):
        gen = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            tuned = GPT2LMHeadModel(tiny_config())
            tuned.load_state_dict(base.state_dict())
            for p in tuned.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.01)
        tuned.save_pretrained(root / name)
        out[name] = root / name / "model.safetensors"
    # the third fine-tune as a bf16 state dict in a .pt, as a training script would save it
    sd = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in load_file(out["ft3"]).items()}
    torch.save(sd, root / "ft3-bf16.pt")
    out["ft3_pt"] = root / "ft3-bf16.pt"
    return out


def arrays(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".pt":
        return {k: v.float().numpy() for k, v in torch.load(path, weights_only=True).items()}
    return load_file(path)


def merged(tmp_path: Path, *args: str, name: str = "out.safetensors") -> dict[str, np.ndarray]:
    out = tmp_path / name
    result = run("merge", *args, "-o", str(out))
    assert result.exit_code == 0, result.output
    return arrays(out)


# --- references, written from mergekit's implementations ---------------------------------------


def ref_linear(tensors: list[np.ndarray], weights: list[float]) -> np.ndarray:
    w = np.array(weights, np.float32).reshape(-1, *[1] * tensors[0].ndim)
    return (np.stack(tensors).astype(np.float32) * w).sum(0) / w.sum()


def ref_slerp(t: float, v0: np.ndarray, v1: np.ndarray, dot_threshold: float = 0.9995, eps: float = 1e-8):
    v0_copy, v1_copy = v0.copy(), v1.copy()
    n0, n1 = np.linalg.norm(v0), np.linalg.norm(v1)
    if n0 > eps:
        v0 = v0 / n0
    if n1 > eps:
        v1 = v1 / n1
    dot = np.sum(v0 * v1)
    if np.abs(dot) > dot_threshold:
        return (1 - t) * v0_copy + t * v1_copy
    theta_0 = np.arccos(dot)
    sin_theta_0 = np.sin(theta_0)
    theta_t = theta_0 * t
    s0 = np.sin(theta_0 - theta_t) / sin_theta_0
    s1 = np.sin(theta_t) / sin_theta_0
    return s0 * v0_copy + s1 * v1_copy


def ref_task_arithmetic(base: np.ndarray, tensors: list[np.ndarray], weights: list[float], lam: float) -> np.ndarray:
    deltas = [w * (t - base) for t, w in zip(tensors, weights)]
    return base + lam * sum(deltas)


def ref_ties(base: np.ndarray, tensors: list[np.ndarray], weights: list[float], density: float, lam: float = 1.0):
    """mergekit's generalized_task_arithmetic with sparsification 'magnitude', consensus 'sum',
    normalize=True, in torch as mergekit runs it."""
    b = torch.from_numpy(base)
    deltas = []
    for t in tensors:
        delta = torch.from_numpy(t) - b
        k = int(density * delta.numel())
        mask = torch.zeros_like(delta)
        topk = torch.argsort(delta.abs().view(-1), descending=True)[:k]
        mask.view(-1)[topk] = 1
        deltas.append(delta * mask)
    stacked = torch.stack(deltas, dim=0)
    w = torch.tensor(weights, dtype=stacked.dtype)
    while len(stacked.shape) > len(w.shape):
        w.unsqueeze_(-1)
    weighted = stacked * w
    sign = weighted.sign()
    majority = (weighted.sum(dim=0) >= 0).to(stacked.dtype) * 2 - 1
    mask = sign == majority
    mixed = (weighted * mask).sum(dim=0)
    divisor = (w * mask).sum(dim=0)
    divisor[divisor == 0] = 1
    mixed /= divisor
    return (b + lam * mixed).numpy()


# --- the methods ---------------------------------------------------------------------------------


def test_linear_weights(models, tmp_path):
    got = merged(tmp_path, str(models["ft1"]), str(models["ft2"]), "--weights", "0.25,0.75")
    a, b = arrays(models["ft1"]), arrays(models["ft2"])
    assert list(got) == list(a)
    for name in a:
        np.testing.assert_allclose(got[name], ref_linear([a[name], b[name]], [0.25, 0.75]), **TOL)
        assert got[name].dtype == np.float32


def test_linear_three_models_mixed_formats_and_dtypes(models, tmp_path):
    """A bf16 .pt among float32 safetensors: arithmetic in float32, output in the first model's dtype."""
    got = merged(tmp_path, str(models["ft1"]), str(models["ft2"]), str(models["ft3_pt"]))
    a, b, c = arrays(models["ft1"]), arrays(models["ft2"]), arrays(models["ft3_pt"])
    for name in a:
        np.testing.assert_allclose(got[name], ref_linear([a[name], b[name], c[name]], [1, 1, 1]), **TOL)


def test_linear_output_dtype_follows_first_model_or_dtype(models, tmp_path):
    """The bf16 .pt first: output bf16 (a .pt that torch loads); --dtype float16 overrides it."""
    out = tmp_path / "soup.pt"
    assert run("merge", str(models["ft3_pt"]), str(models["ft1"]), "-o", str(out)).exit_code == 0
    sd = torch.load(out, weights_only=True)
    c, a = arrays(models["ft3_pt"]), arrays(models["ft1"])
    for name, value in sd.items():
        assert value.dtype == torch.bfloat16
        want = torch.from_numpy(ref_linear([c[name], a[name]], [1, 1])).to(torch.bfloat16)
        assert torch.equal(value, want), name
    got = merged(tmp_path, str(models["ft1"]), str(models["ft2"]), "--dtype", "float16", name="half.safetensors")
    assert {v.dtype for v in got.values()} == {np.dtype(np.float16)}


def test_slerp(models, tmp_path):
    for t in (0.0, 0.3, 1.0):
        got = merged(tmp_path, str(models["ft1"]), str(models["ft2"]), "--method", "slerp", "--t", str(t))
        a, b = arrays(models["ft1"]), arrays(models["ft2"])
        for name in a:
            np.testing.assert_allclose(got[name], ref_slerp(t, a[name], b[name]), rtol=1e-4, atol=1e-6)
    # fine-tunes of one base are nearly colinear (lerp); the base and an unrelated model are not
    got = merged(tmp_path, str(models["base"]), str(models["ft1"]), "--method", "slerp", "--t", "0.3")
    a = arrays(models["base"])
    fresh = {k: np.random.default_rng(1).standard_normal(v.shape).astype(np.float32) for k, v in a.items()}
    from safetensors.numpy import save_file

    save_file(fresh, tmp_path / "fresh.safetensors")
    got = merged(tmp_path, str(models["base"]), str(tmp_path / "fresh.safetensors"), "--method", "slerp", "--t", "0.3")
    arc = 0
    for name in a:
        want = ref_slerp(0.3, a[name], fresh[name])
        np.testing.assert_allclose(got[name], want, rtol=1e-4, atol=1e-5)
        arc += not np.allclose(want, 0.7 * a[name] + 0.3 * fresh[name], atol=1e-5)
    assert arc > 10  # most tensors took the arc, not the lerp fallback


def test_task_arithmetic(models, tmp_path):
    base = arrays(models["base"])
    a, b = arrays(models["ft1"]), arrays(models["ft2"])
    got = merged(
        tmp_path, str(models["ft1"]), str(models["ft2"]), "-m", "task-arithmetic", "--base", str(models["base"]),
        "--weights", "0.7,0.3", "--lambda", "1.5",
    )  # fmt: skip
    for name in a:
        np.testing.assert_allclose(
            got[name], ref_task_arithmetic(base[name], [a[name], b[name]], [0.7, 0.3], 1.5), **TOL
        )


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties(models, tmp_path, density):
    base = arrays(models["base"])
    inputs = [arrays(models[n]) for n in ("ft1", "ft2", "ft3")]
    got = merged(
        tmp_path, *(str(models[n]) for n in ("ft1", "ft2", "ft3")), "-m", "ties", "--base", str(models["base"]),
        "--density", str(density), "--weights", "1,0.5,0.8",
    )  # fmt: skip
    for name in base:
        if math.prod(base[name].shape) * density < 1:
            continue  # mergekit refuses to trim a tensor to nothing; paramctl keeps one entry
        want = ref_ties(base[name], [m[name] for m in inputs], [1, 0.5, 0.8], density)
        np.testing.assert_allclose(got[name], want, **TOL)


def test_trim_keeps_exactly_k_with_equal_magnitudes():
    delta = np.array([0.5, -0.5, 0.1, 0.5, -0.2, 0.0], np.float32)
    assert trim(delta, 0.5).tolist() == [0.5, -0.5, 0.0, 0.5, 0.0, 0.0]  # k = 3
    assert trim(delta, 0.34).tolist() == [0.5, -0.5, 0.0, 0.0, 0.0, 0.0]  # k = 2: the first of equal ones
    assert trim(delta, 0.01).tolist() == [0.5, 0.0, 0.0, 0.0, 0.0, 0.0]  # at least one


def test_ties_and_metadata_of_the_first_model_kept(tmp_path):
    """A tied pair stays one tensor (the declared alias), metadata comes along, integers are copied."""
    from safetensors.torch import load_file as load_torch
    from safetensors.torch import save_model

    class Tied(torch.nn.Module):
        def __init__(self, seed: int):
            super().__init__()
            torch.manual_seed(seed)
            self.emb = torch.nn.Embedding(10, 4)
            self.head = torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight
            self.register_buffer("steps", torch.tensor([seed, 7]))

    for seed in (1, 2):
        save_model(Tied(seed), str(tmp_path / f"t{seed}.safetensors"), metadata={"format": "pt", "run": f"r{seed}"})
    out = tmp_path / "m.safetensors"
    assert (
        run("merge", str(tmp_path / "t1.safetensors"), str(tmp_path / "t2.safetensors"), "-o", str(out)).exit_code == 0
    )
    model = Tied(0)
    from safetensors.torch import load_model

    load_model(model, str(out))
    one, two = load_torch(tmp_path / "t1.safetensors"), load_torch(tmp_path / "t2.safetensors")
    kept = next(k for k in one if k.endswith("weight"))
    assert torch.allclose(model.emb.weight, (one[kept] + two[kept]) / 2)
    assert model.head.weight.data_ptr() == model.emb.weight.data_ptr()
    assert model.steps.tolist() == [1, 7]  # the first model's integers
    from safetensors import safe_open

    with safe_open(out, "np") as f:
        assert f.metadata()["run"] == "r1"
    tied = run("tied", str(out), "--format", "json")
    assert json.loads(tied.output)[0]["names"] == ["emb.weight", "head.weight"]


def test_names_must_match(models, tmp_path):
    from safetensors.numpy import save_file

    fewer = dict(arrays(models["ft1"]))
    fewer.pop("transformer.wpe.weight")
    fewer["extra.weight"] = np.zeros(3, np.float32)
    save_file(fewer, tmp_path / "fewer.safetensors")
    out = tmp_path / "out.safetensors"
    result = run("merge", str(models["ft2"]), str(tmp_path / "fewer.safetensors"), "-o", str(out))
    assert result.exit_code == 2
    assert "lacks 1 tensors" in result.output and "transformer.wpe.weight" in result.output
    assert f"{models['ft2']} lacks 1 tensors of {tmp_path / 'fewer.safetensors'} (extra.weight)" in result.output
    assert not out.exists()
    result = run("merge", str(models["ft2"]), str(tmp_path / "fewer.safetensors"), "--allow-missing", "-o", str(out))
    assert result.exit_code == 0, result.output
    got, b = arrays(out), arrays(models["ft2"])
    assert list(got) == list(b)  # the first model's names
    np.testing.assert_array_equal(got["transformer.wpe.weight"], b["transformer.wpe.weight"])  # only it has it
    bias = "transformer.ln_f.bias"
    np.testing.assert_allclose(got[bias], ref_linear([b[bias], fewer[bias]], [1, 1]), **TOL)


def test_shape_mismatch_and_usage_errors(models, tmp_path):
    from safetensors.numpy import save_file

    other = dict(arrays(models["ft1"]))
    other["transformer.wpe.weight"] = np.zeros((3, 3), np.float32)
    save_file(other, tmp_path / "other.safetensors")
    out = str(tmp_path / "o.safetensors")
    cases = [
        (
            ["merge", str(models["ft1"]), str(tmp_path / "other.safetensors"), "-o", out],
            "'transformer.wpe.weight' is [3, 3]",
        ),
        (["merge", str(models["ft1"]), "-m", "task-arithmetic", "-o", out], "needs --base"),
        (
            ["merge", str(models["ft1"]), str(models["ft2"]), str(models["ft3"]), "-m", "slerp", "-o", out],
            "exactly two",
        ),
        (["merge", str(models["ft1"]), str(models["ft2"]), "--weights", "1,2,3", "-o", out], "3 weights for 2 models"),
        (["merge", str(models["ft1"]), str(models["ft2"]), "--weights", "1,-1", "-o", out], "sum to 0"),
    ]
    for args, message in cases:
        result = run(*args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, result.output
        assert "Traceback" not in result.output


# --- LoRA --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_cases(models, tmp_path_factory):
    """Adapters saved by peft, and the logits of peft's merge_and_unload() on a fixed input."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    root = tmp_path_factory.mktemp("lora")
    ids = torch.arange(20).reshape(2, 10) % 100
    cases = {}
    configs = {
        "plain": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"]),
        "patterns": dict(
            r=4,
            lora_alpha=16,
            target_modules=["c_attn", "c_proj", "c_fc"],
            use_rslora=True,
            rank_pattern={"c_fc": 2, "h.1.attn.c_attn": 3},
            alpha_pattern={"c_proj": 5},
        ),
    }
    for name, kwargs in configs.items():
        torch.manual_seed(3)
        model = GPT2LMHeadModel.from_pretrained(models["base_dir"])
        peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, fan_in_fan_out=True, **kwargs))
        peft_model.save_pretrained(root / name)
        merged = peft_model.merge_and_unload().eval()
        with torch.no_grad():
            cases[name] = (root / name, merged(ids).logits, {k: v.clone() for k, v in merged.state_dict().items()})
    torch.manual_seed(3)
    dora = get_peft_model(
        GPT2LMHeadModel.from_pretrained(models["base_dir"]),
        LoraConfig(r=2, target_modules=["c_attn"], use_dora=True, fan_in_fan_out=True),
    )
    dora.save_pretrained(root / "dora")
    return cases, ids, root


@pytest.mark.parametrize("case", ["plain", "patterns"])
def test_lora_fold_matches_peft_merge_and_unload(models, lora_cases, tmp_path, case):
    import shutil

    from transformers import GPT2LMHeadModel

    cases, ids, _ = lora_cases
    adapter, want_logits, want_state = cases[case]
    out_dir = tmp_path / "merged"
    out_dir.mkdir()
    shutil.copy(models["base_dir"] / "config.json", out_dir)
    result = run("merge", "--lora", str(adapter), str(models["base"]), "-o", str(out_dir / "model.safetensors"))
    assert result.exit_code == 0, result.output
    model = GPT2LMHeadModel.from_pretrained(out_dir).eval()
    with torch.no_grad():
        logits = model(ids).logits
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
    got = model.state_dict()
    for name, value in want_state.items():
        torch.testing.assert_close(got[name], value, rtol=1e-6, atol=1e-6)
    base = arrays(models["base"])
    changed = [k for k, v in arrays(out_dir / "model.safetensors").items() if not np.array_equal(v, base[k])]
    suffixes = ("c_attn.weight", "c_proj.weight") + (("c_fc.weight",) if case == "patterns" else ())
    assert sorted(changed) == sorted(k for k in base if k.endswith(suffixes))


def test_lora_refuses_dora_and_non_adapters(models, lora_cases, tmp_path):
    _, _, root = lora_cases
    out = str(tmp_path / "x.safetensors")
    result = run("merge", "--lora", str(root / "dora"), str(models["base"]), "-o", out)
    assert result.exit_code == 2
    assert "DoRA (use_dora)" in result.output and "not supported" in result.output
    result = run("merge", "--lora", str(tmp_path), str(models["base"]), "-o", out)
    assert result.exit_code == 2 and "no adapter_config.json" in result.output
    result = run("merge", "--lora", str(root / "plain"), str(models["base"]), str(models["ft1"]), "-o", out)
    assert result.exit_code == 2 and "one base model" in result.output
    assert not (tmp_path / "x.safetensors").exists()


# --- lora extract --------------------------------------------------------------------------------


def test_lora_extract_loads_in_peft_and_reproduces_a_low_rank_fine_tune(tmp_path):
    """A Llama fine-tune whose q/v projections moved by rank-2 updates: the rank-2 adapter that
    paramctl extracts, loaded by PeftModel.from_pretrained on the base, gives the tuned logits."""
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32, intermediate_size=64,
        vocab_size=64, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).eval()
    base.save_pretrained(tmp_path / "base")
    tuned = LlamaForCausalLM(config).eval()
    tuned.load_state_dict(base.state_dict())
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if name.endswith(("q_proj.weight", "v_proj.weight")):
                p.add_(torch.randn(p.shape[0], 2, generator=gen) @ torch.randn(2, p.shape[1], generator=gen) * 0.05)
    tuned.save_pretrained(tmp_path / "tuned")
    result = run(
        "lora", "extract", str(tmp_path / "base" / "model.safetensors"), str(tmp_path / "tuned" / "model.safetensors"),
        "--rank", "2", "-o", str(tmp_path / "adapter"),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "rank 2 on 4 modules" in result.output
    ids = torch.arange(24).reshape(2, 12) % 64
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(peft_model.eval()(ids).logits, tuned(ids).logits, rtol=1e-4, atol=1e-4)
    # folding it back gives the tuned weights
    out = tmp_path / "back.safetensors"
    assert (
        run(
            "merge", "--lora", str(tmp_path / "adapter"), str(tmp_path / "base" / "model.safetensors"), "-o", str(out)
        ).exit_code
        == 0
    )
    back, want = arrays(out), arrays(tmp_path / "tuned" / "model.safetensors")
    for name in want:
        np.testing.assert_allclose(back[name], want[name], rtol=1e-4, atol=1e-5)


def test_lora_extract_gpt2_conv1d_is_the_best_rank_r_approximation(models, tmp_path):
    """GPT-2 stores (in, out): --fan-in-fan-out. Full-rank differences become their best rank-3
    approximation (Eckart-Young: the truncated SVD); a changed layer norm is named and left out."""
    result = run(
        "lora", "extract", str(models["base"]), str(models["ft1"]), "-r", "3", "-p", r"attn\.c_attn|ln_1",
        "--fan-in-fan-out", "-o", str(tmp_path / "adapter"),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "6 changed tensors are not 2-D weights, left out: transformer.h.0.attn.c_attn.bias" in result.output
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert config["fan_in_fan_out"] is True and config["r"] == config["lora_alpha"] == 3
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    base, tuned = arrays(models["base"]), arrays(models["ft1"])
    for module in config["target_modules"]:
        a, b = adapter[f"base_model.model.{module}.lora_A.weight"], adapter[f"base_model.model.{module}.lora_B.weight"]
        delta = (tuned[module + ".weight"] - base[module + ".weight"]).T.astype(np.float64)
        u, s, vh = np.linalg.svd(delta, full_matrices=False)
        np.testing.assert_allclose(b @ a, (u[:, :3] * s[:3]) @ vh[:3], atol=1e-5)


def test_lora_on_a_tied_weight_changes_the_tie_and_keeps_it(tmp_path):
    """An adapter on a head tied to the embedding (one storage in the .pt) changes both names, as
    peft changes the one shared parameter, and the output still stores them once."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = tied_module()
    torch.save(model.state_dict(), tmp_path / "base.pt")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    a, b = torch.randn(2, 4), torch.randn(10, 2)
    save_file(
        {"base_model.model.head.lora_A.weight": a, "base_model.model.head.lora_B.weight": b},
        str(adapter / "adapter_model.safetensors"),
    )
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    out = tmp_path / "out.pt"
    assert run("merge", "--lora", str(adapter), str(tmp_path / "base.pt"), "-o", str(out)).exit_code == 0
    sd = torch.load(out, weights_only=True)
    want = model.emb.weight.detach() + 2.0 * b @ a
    torch.testing.assert_close(sd["head.weight"], want)
    assert sd["emb.weight"].data_ptr() == sd["head.weight"].data_ptr()
