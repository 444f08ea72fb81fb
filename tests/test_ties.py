"""Ties: shared, declared and equal; overlaps are not ties; tie / untie; writers keep ties."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SAMPLES, run
from safetensors import safe_open
from torch import nn

import paramctl


def tied(path, *args: str) -> list[dict]:
    result = run("tied", str(path), *args, "-f", "json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


class TinyGPT(nn.Module):
    """An embedding whose matrix is also the output head, as GPT-2 ties them."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(50, 8)
        self.block = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 50, bias=False)
        self.lm_head.weight = self.wte.weight


@pytest.fixture
def gpt(tmp_path):
    from safetensors.torch import save_model

    torch.manual_seed(0)
    model = TinyGPT()
    torch.save(model.state_dict(), tmp_path / "gpt.pt")
    save_model(model, str(tmp_path / "gpt.safetensors"))
    return model, tmp_path / "gpt.pt", tmp_path / "gpt.safetensors"


def test_shared_layer_mlp_is_shared():
    assert tied(SAMPLES / "shared.pt") == [
        {"names": ["2.weight", "4.weight"], "kind": "shared"},
        {"names": ["2.bias", "4.bias"], "kind": "shared"},
    ]
    rows = json.loads(run("ls", str(SAMPLES / "shared.pt"), "-f", "json").stdout)
    assert {r["name"]: r["tie"] for r in rows if r["tie"]} == {
        "2.weight": "2.weight",
        "4.weight": "2.weight",
        "2.bias": "2.bias",
        "4.bias": "2.bias",
    }


def test_gpt_tied_head_shared_in_pt_and_declared_in_safetensors(gpt):
    _, pt, st = gpt
    assert tied(pt) == [{"names": ["wte.weight", "lm_head.weight"], "kind": "shared"}]
    assert tied(st) == [{"names": ["lm_head.weight", "wte.weight"], "kind": "declared"}]  # save_model's choice
    assert len(json.loads(run("ls", str(st), "-f", "json").stdout)) == 4  # both names are rows


def test_fused_qkv_views_are_not_ties_but_overlaps(tmp_path):
    qkv = torch.randn(12, 4)
    path = tmp_path / "qkv.pt"
    torch.save({"qkv": qkv, "q": qkv[:4], "k": qkv[4:8], "v": qkv[8:], "k_cols": qkv[:, 1:3]}, path)
    assert tied(path) == []
    pairs = {tuple(r["names"]) for r in tied(path, "--overlaps")}
    assert pairs == {
        ("qkv", "q"),
        ("qkv", "k"),
        ("qkv", "v"),
        ("qkv", "k_cols"),
        ("q", "k_cols"),
        ("k", "k_cols"),
        ("v", "k_cols"),
    }
    disjoint = tmp_path / "cols.pt"
    torch.save({"a": qkv[:, :2], "b": qkv[:, 2:]}, disjoint)  # interleaved in memory, no shared element
    assert tied(disjoint, "--overlaps") == []


def test_equal_tensors_only_by_value(tmp_path):
    path = tmp_path / "eq.pt"
    base = torch.arange(20_000, dtype=torch.float32)
    torch.save(
        {"a": base.clone(), "b": base.clone(), "c": base.clone() + 1, "d": torch.ones(3), "e": torch.ones(3)}, path
    )
    assert tied(path) == []
    found = tied(path, "--by-value")
    assert sorted(sorted(g["names"]) for g in found) == [["a", "b"], ["d", "e"]]
    assert {g["kind"] for g in found} == {"equal"}


def test_equal_compares_every_byte(tmp_path):
    """Same first and last bytes (the fingerprint) but one differing value in the middle."""
    a = torch.zeros(3_000_000)
    b = a.clone()
    b[1_500_000] = 1
    path = tmp_path / "near.safetensors"
    from safetensors.torch import save_file

    save_file({"a": a, "b": b, "c": a.clone()}, path)
    assert [sorted(g["names"]) for g in tied(path, "--by-value")] == [["a", "c"]]


def test_tie_in_pt_shares_storage(tmp_path, gpt):
    model, pt, _ = gpt
    untied = tmp_path / "untied.pt"
    assert run("untie", str(pt), "-o", str(untied)).exit_code == 0
    sd = torch.load(untied)
    assert sd["wte.weight"].data_ptr() != sd["lm_head.weight"].data_ptr()
    assert torch.equal(sd["wte.weight"], sd["lm_head.weight"])
    assert tied(untied) == []
    retied = tmp_path / "retied.pt"
    assert run("tie", str(untied), "wte.weight", "lm_head.weight", "-o", str(retied)).exit_code == 0
    sd = torch.load(retied)
    assert sd["wte.weight"].data_ptr() == sd["lm_head.weight"].data_ptr()
    fresh = TinyGPT()
    fresh.load_state_dict(sd, strict=True)


def test_tie_in_safetensors_is_one_copy_plus_alias(tmp_path, gpt):
    from safetensors.torch import load_file, load_model

    model, pt, _ = gpt
    untied = tmp_path / "untied.safetensors"
    assert run("untie", str(pt), "-o", str(untied)).exit_code == 0
    assert sorted(load_file(untied)) == ["block.bias", "block.weight", "lm_head.weight", "wte.weight"]
    out = tmp_path / "tied.safetensors"
    assert run("tie", str(untied), "wte.weight", "lm_head.weight", "-o", str(out)).exit_code == 0
    assert sorted(load_file(out)) == ["block.bias", "block.weight", "wte.weight"]  # SRC is the copy kept
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"format": "pt", "lm_head.weight": "wte.weight"}  # {dropped: kept}
    fresh = TinyGPT()
    load_model(fresh, str(out))
    assert torch.equal(fresh.lm_head.weight, model.wte.weight)
    assert tied(out) == [{"names": ["wte.weight", "lm_head.weight"], "kind": "declared"}]
    # the other way round, SRC is still the copy kept, whatever the alphabet or the table's order
    back = tmp_path / "back.safetensors"
    assert run("tie", str(out), "lm_head.weight", "wte.weight", "-o", str(back)).exit_code == 0
    assert sorted(load_file(back)) == ["block.bias", "block.weight", "lm_head.weight"]
    with safe_open(str(back), "pt") as f:
        assert f.metadata() == {"format": "pt", "wte.weight": "lm_head.weight"}


def test_safetensors_keeps_the_first_name_in_the_sources_order(tmp_path, gpt):
    """transformers keeps `transformer.wte.weight` of GPT-2 and `shared.weight` of T5, the first
    name in module order, and the other names of the group are declared aliases of it."""
    from safetensors.torch import load_file

    _, pt, _ = gpt
    out = tmp_path / "out.safetensors"
    assert run("convert", str(pt), str(out)).exit_code == 0
    assert sorted(load_file(out)) == ["block.bias", "block.weight", "wte.weight"]
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"format": "pt", "lm_head.weight": "wte.weight"}
    # four names of one tensor, as T5 ties shared, both embed_tokens and lm_head
    names = ["shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"]
    shared = torch.randn(10, 4)
    torch.save({**dict.fromkeys(names, shared), "final.bias": torch.zeros(4)}, tmp_path / "t5.pt")
    assert run("convert", str(tmp_path / "t5.pt"), str(out)).exit_code == 0
    assert sorted(load_file(out)) == ["final.bias", "shared.weight"]
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"format": "pt", **dict.fromkeys(names[1:], "shared.weight")}


def test_tie_refuses_mismatched_shapes_and_writes_nothing(tmp_path):
    out = tmp_path / "x.pt"
    result = run("tie", str(SAMPLES / "mlp.pt"), "0.weight", "2.weight", "-o", str(out))
    assert result.exit_code == 2
    assert "shape and dtype must match" in result.stderr
    assert not out.exists()
    assert run("tie", str(SAMPLES / "mlp.pt"), "0.weight", "nope", "-o", str(out)).exit_code == 2


def test_pt_to_safetensors_to_pt_keeps_the_tie(tmp_path):
    st, back = tmp_path / "s.safetensors", tmp_path / "back.pt"
    run("convert", str(SAMPLES / "shared.pt"), str(st))
    run("convert", str(st), str(back))
    sd = torch.load(back)
    assert sd["2.weight"].data_ptr() == sd["4.weight"].data_ptr()
    assert sd["2.bias"].data_ptr() == sd["4.bias"].data_ptr()


def test_tie_in_keras_weights_is_copies_plus_record(tmp_path):
    import keras
    import numpy as np

    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(6), keras.layers.Dense(6)])
    src, out = tmp_path / "m.weights.h5", tmp_path / "tied.weights.h5"
    model.save_weights(src)
    result = run("tie", str(src), "layers/dense/vars/0", "layers/dense_1/vars/0", "-o", str(out))
    assert result.exit_code == 0, result.stderr
    model.load_weights(out)
    first, second = (keras.ops.convert_to_numpy(layer.kernel) for layer in model.layers)
    np.testing.assert_array_equal(first, second)
    assert tied(out) == [{"names": ["layers/dense/vars/0", "layers/dense_1/vars/0"], "kind": "declared"}]


def test_edits_through_a_tie_change_both_names(tmp_path):
    ckpt = paramctl.load(str(SAMPLES / "shared.pt"))
    ckpt.assign(ckpt["4.weight"], 0.5)
    out = tmp_path / "edited.pt"
    paramctl.save(ckpt, str(out))
    sd = torch.load(out)
    assert sd["2.weight"].data_ptr() == sd["4.weight"].data_ptr()
    assert (sd["2.weight"] == 0.5).all()
