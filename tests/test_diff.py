"""diff: statuses, metrics against numpy, tolerances, output modes, exit codes, bounded memory."""

from __future__ import annotations

import json
import math
import tracemalloc

import numpy as np
import pytest
import torch
from conftest import SAMPLES, run
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import paramctl
from paramctl.diff import COLUMNS, Tolerance, accumulate, compare
from paramctl.table import tensor_from_array


def diff_json(a, b, *args: str, code: int | None = None) -> list[dict]:
    result = run("diff", str(a), str(b), *args, "--format", "json")
    if code is not None:
        assert result.exit_code == code, result.stderr
    rows = json.loads(result.stdout)
    assert all(list(row) == COLUMNS for row in rows)
    return rows


def by_name(rows: list[dict]) -> dict[str, dict]:
    return {r["name"]: r for r in rows}


def expected_metrics(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return {
        "max_abs": float(np.abs(a - b).max()),
        "rel_l2": float(np.linalg.norm(a - b) / np.linalg.norm(b)),
        "cosine": float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))),
    }


def assert_metrics(row: dict, a: np.ndarray, b: np.ndarray) -> None:
    for key, value in expected_metrics(a, b).items():
        assert row[key] == pytest.approx(value, rel=1e-12, abs=1e-15), (row["name"], key)


@pytest.fixture
def model(tmp_path):
    """A small CNN's state_dict as .pt, with its safetensors conversion made by safetensors itself."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 10)
    )
    sd = net.state_dict()
    torch.save(sd, tmp_path / "model.pt")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    return sd, tmp_path / "model.pt", tmp_path / "model.safetensors"


# --- the same ------------------------------------------------------------------------------------


def test_a_file_and_its_conversion_are_the_same(model, tmp_path):
    sd, pt, st = model
    rows = diff_json(pt, st, code=0)
    assert [r["name"] for r in rows] == list(sd)
    assert all(r["status"] == "same" and (r["max_abs"], r["rel_l2"], r["cosine"]) == (0.0, 0.0, 1.0) for r in rows)
    converted = tmp_path / "converted.safetensors"
    assert run("convert", str(pt), str(converted)).exit_code == 0
    assert run("diff", str(pt), str(converted)).exit_code == 0
    assert run("diff", str(converted), str(pt)).exit_code == 0


@pytest.mark.parametrize("sample", ["mlp.pt", "nested.pt", "shared.pt"])
def test_samples_against_their_conversions(tmp_path, sample):
    for suffix in (".safetensors", ".h5", ".pt"):
        out = tmp_path / f"x{suffix}"
        assert run("convert", str(SAMPLES / sample), str(out)).exit_code == 0
        result = run("diff", str(SAMPLES / sample), str(out))
        assert result.exit_code == 0, (suffix, result.stdout)


def test_views_and_every_dtype_compare_by_value_across_formats(tmp_path):
    big = torch.randn(10, 5)
    sd = {
        "t": torch.randn(4, 6).t(),
        "rows": big[3:7],
        "col": big[:, 2],
        "expand": torch.arange(3.0).expand(4, 3),
        "bf16": torch.randn(7).to(torch.bfloat16),
        "f8": torch.randn(7).to(torch.float8_e4m3fn),
        "i8": torch.arange(-3, 4, dtype=torch.int8),
        "b": torch.tensor([True, False]),
        "c": torch.randn(3, dtype=torch.complex64),
        "nan": torch.tensor([math.nan, 1.0, -0.0]),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 3),
    }
    torch.save(sd, tmp_path / "views.pt")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "views.safetensors"))
    rows = diff_json(tmp_path / "views.pt", tmp_path / "views.safetensors", code=0)
    assert {r["status"] for r in rows} == {"same"}


def test_sharded_against_single_file(tmp_path):
    index = tmp_path / "sharded" / "model.safetensors.index.json"
    assert run("convert", str(SAMPLES / "mlp.pt"), str(index)).exit_code == 0
    assert run("diff", str(SAMPLES / "mlp.pt"), str(index.parent)).exit_code == 0


# --- differences ---------------------------------------------------------------------------------


def test_edited_copy_reports_exactly_the_edited_tensors_with_numpy_metrics(model, tmp_path):
    sd, pt, _ = model
    edited = {k: v.clone() for k, v in sd.items()}
    gen = torch.Generator().manual_seed(1)
    edited["0.weight"] += 0.01 * torch.randn(edited["0.weight"].shape, generator=gen)
    edited["3.bias"] *= -2
    edited["1.running_var"][0] = 7.0
    torch.save(edited, tmp_path / "edited.pt")
    result = run("diff", str(pt), str(tmp_path / "edited.pt"), "--format", "json")
    assert result.exit_code == 1
    assert "3 of 9 tensors differ (values: 3)" in result.stderr
    rows = by_name(json.loads(result.stdout))
    assert {n for n, r in rows.items() if r["status"] != "same"} == {"0.weight", "3.bias", "1.running_var"}
    for name in ("0.weight", "3.bias", "1.running_var"):
        assert rows[name]["status"] == "values"
        assert_metrics(rows[name], sd[name].numpy(), edited[name].numpy())
    assert rows["3.bias"]["cosine"] == pytest.approx(-1.0)
    assert rows["1.num_batches_tracked"] == {
        "name": "1.num_batches_tracked",
        "status": "same",
        "max_abs": 0.0,
        "rel_l2": 0.0,
        "cosine": 1.0,
    }


def test_renamed_added_reshaped_and_retyped(tmp_path):
    a = {"w": torch.randn(4, 3), "b": torch.randn(4), "old": torch.ones(2), "emb": torch.randn(6, 2)}
    b = {
        "w": a["w"].reshape(3, 4).clone(),
        "b": a["b"].to(torch.float16),
        "new": torch.ones(2),
        "emb": a["emb"].clone(),
        "extra": torch.zeros(1),
    }
    torch.save(a, tmp_path / "a.pt")
    save_file(b, str(tmp_path / "b.safetensors"))
    rows = diff_json(tmp_path / "a.pt", tmp_path / "b.safetensors", code=1)
    assert [(r["name"], r["status"]) for r in rows] == [
        ("w", "shape"),
        ("b", "dtype"),
        ("old", "only-a"),
        ("emb", "same"),
        ("extra", "only-b"),  # B's own names in B's order (safetensors sorts its header)
        ("new", "only-b"),
    ]
    status = by_name(rows)
    assert status["w"]["max_abs"] is None and status["old"]["cosine"] is None
    assert_metrics(status["b"], a["b"].numpy(), b["b"].float().numpy())  # a dtype change still gets its error


def test_tolerances_decide_same(tmp_path):
    x = np.linspace(-1, 1, 101, dtype=np.float32)
    torch.save({"x": torch.from_numpy(x), "z": torch.tensor([0.0, math.nan])}, tmp_path / "a.pt")
    y = x + np.float32(1e-6)
    torch.save({"x": torch.from_numpy(y), "z": torch.tensor([-0.0, math.nan])}, tmp_path / "b.pt")
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    assert [r["status"] for r in diff_json(a, b, code=1)] == ["values", "values"]  # bit-identical by default
    assert [r["status"] for r in diff_json(a, b, "--atol", "1e-5", code=0)] == ["same", "same"]
    assert [r["status"] for r in diff_json(a, b, "--atol", "1e-8", code=1)] == ["values", "same"]
    assert [r["status"] for r in diff_json(a, b, "--rtol", "1e-4", code=1)] == ["values", "same"]  # x = 0 is in x
    z = by_name(diff_json(a, b))["z"]  # -0.0 vs 0.0 differs in bits, not in value; NaN = NaN
    assert (z["max_abs"], z["rel_l2"], z["cosine"]) == (0.0, 0.0, 1.0)


def test_nan_on_one_side_is_a_difference_even_within_tolerance(tmp_path):
    torch.save({"x": torch.tensor([1.0, 2.0, 3.0])}, tmp_path / "a.pt")
    torch.save({"x": torch.tensor([1.0, math.nan, 3.0])}, tmp_path / "b.pt")
    (row,) = diff_json(tmp_path / "a.pt", tmp_path / "b.pt", "--atol", "10", code=1)
    assert row["status"] == "values"
    assert row["max_abs"] == 0.0  # over the positions where both are finite


def test_zero_norms():
    zeros = tensor_from_array("z", np.zeros(4, np.float32))
    ones = tensor_from_array("o", np.ones(4, np.float32))
    assert compare(zeros, tensor_from_array("z", -np.zeros(4, np.float32)))["cosine"] == 1.0
    row = compare(ones, zeros)
    assert (row["status"], row["max_abs"], row["rel_l2"], row["cosine"]) == ("values", 1.0, None, None)
    row = compare(zeros, ones)
    assert (row["rel_l2"], row["cosine"]) == (1.0, None)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(-1e6, 1e6, width=32), min_size=1, max_size=300),
    st.integers(0, 2**32 - 1),
    st.integers(1, 64),
)
def test_chunked_sums_equal_whole_array_metrics(values, seed, chunk):
    a = np.asarray(values, np.float32)
    b = a + np.random.default_rng(seed).normal(size=a.size).astype(np.float32)
    sums = accumulate(tensor_from_array("a", a), tensor_from_array("b", b), Tolerance(), chunk=chunk)
    if np.linalg.norm(b.astype(np.float64)) and np.linalg.norm(a.astype(np.float64)):
        got = sums.metrics()
        for key, value in expected_metrics(a, b).items():
            assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12)


# --- output and exit codes -----------------------------------------------------------------------


def test_piped_rows_are_stable_tsv_and_only_different_hides_same(model, tmp_path):
    sd, pt, _ = model
    sd = dict(sd)
    sd["3.bias"] = sd["3.bias"] + 1
    torch.save(sd, tmp_path / "b.pt")
    lines = run("diff", str(pt), str(tmp_path / "b.pt")).stdout.splitlines()
    assert [line.split("\t")[:2] for line in lines] == [[n, "values" if n == "3.bias" else "same"] for n in sd]
    assert lines[0] == "0.weight\tsame\t0.0\t0.0\t1.0"
    only = run("diff", str(pt), str(tmp_path / "b.pt"), "--only-different")
    assert only.exit_code == 1
    assert [line.split("\t")[0] for line in only.stdout.splitlines()] == ["3.bias"]
    jsonl = [
        json.loads(line) for line in run("diff", str(pt), str(tmp_path / "b.pt"), "-f", "jsonl").stdout.splitlines()
    ]
    assert jsonl == diff_json(pt, tmp_path / "b.pt")
    assert run("diff", str(pt), str(pt), "--only-different").stdout == ""


def test_table_on_a_terminal(tmp_path):
    torch.save({"w": torch.zeros(2, 3), "b": torch.zeros(2)}, tmp_path / "a.pt")
    torch.save({"w": torch.zeros(3, 2), "b": torch.zeros(2)}, tmp_path / "b.pt")
    result = run("diff", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), tty=True)
    lines = result.stdout.splitlines()
    assert lines[1].split() == ["name", "status", "max_abs", "rel_l2", "cosine", "detail"]
    assert lines[2].split() == ["w", "shape", "-", "-", "-", "[2,", "3]", "->", "[3,", "2]"]
    assert lines[-1].split() == ["2", "tensors", "1", "differ"]


def test_pattern_selects_names_on_both_sides(model, tmp_path):
    _, pt, st = model
    rows = diff_json(pt, st, "weight$", "-x", "^1")
    assert [r["name"] for r in rows] == ["0.weight", "3.weight"]


def test_errors_exit_2(model, tmp_path):
    _, pt, _ = model
    result = run("diff", str(pt), str(tmp_path / "missing.pt"))
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "missing.pt" in result.stderr
    (tmp_path / "junk.pt").write_bytes(b"junk")
    assert run("diff", str(tmp_path / "junk.pt"), str(pt)).exit_code == 2


def test_two_large_tensors_stream_in_bounded_memory(tmp_path):
    n = 2 << 20  # 2 Mi float32: 8 MiB per file, read 256 Ki elements (1 MiB) at a time
    a = np.arange(n, dtype=np.float32) % 1000
    save_file({"x": torch.from_numpy(a)}, str(tmp_path / "a.safetensors"))
    a[-5:] += 1  # only the last chunk differs: the byte comparison reads everything before it
    save_file({"x": torch.from_numpy(a)}, str(tmp_path / "b.safetensors"))
    left, right = paramctl.load(str(tmp_path / "a.safetensors")), paramctl.load(str(tmp_path / "b.safetensors"))
    tracemalloc.start()
    row = compare(left["x"], right["x"], chunk=1 << 18)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert row["status"] == "values"
    assert_metrics({"name": "x", **row}, np.arange(n, dtype=np.float32) % 1000, a)
    assert peak < 6 << 20  # two 1 MiB chunk buffers and block temporaries: less than one file
