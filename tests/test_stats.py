"""`stats` against a float64 numpy reference, chunking as a property, and the `check` gate."""

from __future__ import annotations

import json
import math
import os

import ml_dtypes
import numpy as np
import pytest
from conftest import run
from hypothesis import given, settings
from hypothesis import strategies as st

import paramctl
from paramctl import stats
from paramctl.errors import FormatError
from paramctl.stats import Summary, summarize
from paramctl.table import tensor_from_array

RNG = np.random.default_rng(7)
SPECIAL = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1.5], np.float32)


def corpus() -> dict[str, np.ndarray]:
    """The same arrays on every call: every dtype, NaN/Inf, all-zero, all-NaN, empty and 0-d."""
    rng = np.random.default_rng(7)
    normal = rng.normal(0.5, 2.0, (64, 33)).astype(np.float32)
    arrays = {
        "f32": normal,
        "f32_special": np.concatenate([normal.ravel(), SPECIAL]),
        "f64": rng.normal(-1, 3, 1000),
        "f16": np.concatenate([normal.ravel(), SPECIAL]).astype(np.float16),
        "bf16": np.concatenate([normal.ravel(), SPECIAL]).astype(ml_dtypes.bfloat16),
        "f8_e4m3": np.clip(normal, -400, 400).astype(ml_dtypes.float8_e4m3fn),
        "f8_e5m2": np.concatenate([normal.ravel(), SPECIAL]).astype(ml_dtypes.float8_e5m2),
        "i8": rng.integers(-128, 127, 500, dtype=np.int8),
        "i64": rng.integers(-(10**6), 10**6, 500, dtype=np.int64),
        "u8": rng.integers(0, 255, 500, dtype=np.uint8),
        "u16": rng.integers(0, 65535, 500, dtype=np.uint16),
        "bool": rng.random(300) > 0.3,
        "zeros": np.zeros((4, 4), np.float32),
        "all_nan": np.full(3, np.nan, np.float32),
        "empty": np.zeros((256, 0), np.float32),
        "scalar": np.array(3.25, np.float32),
    }
    return arrays


def reference(values: np.ndarray) -> dict:
    x = values.astype(np.float64).ravel()
    finite = x[np.isfinite(x)]
    has = finite.size > 0
    return {
        "mean": finite.mean() if has else None,
        "std": finite.std() if has else None,
        "min": finite.min() if has else None,
        "max": finite.max() if has else None,
        "absmax": np.abs(finite).max() if has else None,
        "norm": float(np.sqrt((finite**2).sum())),
        "zeros": int((x == 0).sum()),
        "nans": int(np.isnan(x).sum()),
        "infs": int(np.isinf(x).sum()),
    }


def assert_close(got: dict, want: dict, rel: float = 1e-6) -> None:
    for key, expected in want.items():
        actual = got[key]
        if expected is None or isinstance(expected, int):
            assert actual == expected, key
        else:
            assert actual == pytest.approx(expected, rel=rel, abs=1e-12), key


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    import torch
    from safetensors.numpy import save_file

    base = tmp_path_factory.mktemp("stats")
    arrays = corpus()
    st_path = base / "all.safetensors"
    save_file({k: v.copy(order="C") for k, v in arrays.items()}, str(st_path))
    pt_path = base / "all.pt"
    as_torch = {}
    for k, v in arrays.items():
        if v.dtype == ml_dtypes.bfloat16:
            as_torch[k] = torch.from_numpy(v.view(np.int16)).view(torch.bfloat16)
        elif v.dtype in (ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2):
            target = torch.float8_e4m3fn if v.dtype == ml_dtypes.float8_e4m3fn else torch.float8_e5m2
            as_torch[k] = torch.from_numpy(v.view(np.uint8)).view(target)
        else:
            as_torch[k] = torch.from_numpy(v.copy(order="C"))
    as_torch["transposed"] = torch.from_numpy(arrays["f32"]).t()
    torch.save(as_torch, pt_path)
    return {"safetensors": str(st_path), "pt": str(pt_path)}


@pytest.mark.parametrize("kind", ["safetensors", "pt"])
def test_stats_match_numpy_float64_reference(files, kind):
    rows = json.loads(run("stats", files[kind], "-f", "json").stdout)
    arrays = corpus()
    if kind == "pt":
        arrays["transposed"] = arrays["f32"].T
    assert {r["name"] for r in rows} == set(arrays)
    for row in rows:
        want = arrays[row["name"]]
        assert row["numel"] == want.size
        assert row["shape"] == list(want.shape)
        assert_close(row, reference(want))


def test_stats_piped_rows_and_hist_json(files):
    lines = run("stats", files["safetensors"], "^f32$").stdout.splitlines()
    assert len(lines) == 1 and lines[0].split("\t")[:4] == ["f32", "[64, 33]", "float32", "2112"]
    row = json.loads(run("stats", files["safetensors"], "f32_special", "--hist", "-f", "json").stdout)[0]
    assert sum(row["hist"]["counts"]) == row["numel"] - row["nans"] - row["infs"]
    assert len(row["hist"]["edges"]) == 17
    assert row["hist"]["edges"][0] == row["min"] and row["hist"]["edges"][-1] == row["max"]


def test_stats_table_has_totals_and_sparkline(files):
    out = run("stats", files["safetensors"], "f32_special|^bool$", "--hist", tty=True).stdout
    footer = out.splitlines()[-1].split()
    assert footer[:2] == ["2", "tensors,"]
    assert footer[-2:] == ["1", "2"]  # one NaN, two infinities in total
    assert any(c in out for c in "▁▂▃▄▅▆▇█")


def test_strange_distribution_shows_its_hole(tmp_path):
    """The chapter's custom init: U(5,10) / 0 / U(-10,-5) with probabilities 1/4, 1/2, 1/4."""
    values = RNG.uniform(-10, 10, 20000).astype(np.float32)
    values[np.abs(values) < 5] = 0
    summary = summarize(tensor_from_array("w", values), hist=True)
    counts = summary.hist
    assert counts[4:8] == [0, 0, 0, 0] and counts[9:12] == [0, 0, 0]
    assert counts[8] == int((values == 0).sum())


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    shape=st.lists(st.integers(0, 9), min_size=0, max_size=3),
    dtype=st.sampled_from(["float32", "float16", "bfloat16", "float64", "int32", "uint8", "float8_e5m2"]),
    chunk=st.integers(1, 50),
    seed=st.integers(0, 2**16),
)
def test_chunked_equals_whole(shape, dtype, chunk, seed):
    from paramctl.dtypes import numpy_dtype

    rng = np.random.default_rng(seed)
    if "int" in dtype:
        array = rng.integers(0, 100, shape).astype(numpy_dtype(dtype))
    else:
        values = rng.normal(0, 10, shape)
        if values.size:
            values.ravel()[rng.integers(0, values.size)] = rng.choice([np.nan, np.inf, 0.0])
        array = values.astype(numpy_dtype(dtype))
    tensor = tensor_from_array("x", array)
    whole = Summary()
    if array.size:
        whole.add(array.ravel())
    chunked = summarize(tensor, chunk=chunk)
    got, want = chunked.row(), whole.row()
    for key in want:
        if want[key] is None or isinstance(want[key], int):
            assert got[key] == want[key], key
        else:
            assert math.isclose(got[key], want[key], rel_tol=1e-9, abs_tol=1e-9), key


def test_stats_streams_from_file_in_chunks(tmp_path):
    from safetensors.numpy import save_file

    values = RNG.normal(0, 1, 10_001).astype(np.float32)
    path = tmp_path / "x.safetensors"
    save_file({"x": values}, str(path))
    tensor = paramctl.load(str(path))["x"]
    sizes = [c.size for c in tensor.chunks(1000)]
    assert sizes == [1000] * 10 + [1]
    assert_close(summarize(tensor, chunk=1000).row(), reference(values), rel=1e-9)


def test_chunks_of_a_range_read_only_that_range(tmp_path):
    from safetensors.numpy import save_file

    values = RNG.normal(0, 1, 10_001).astype(np.float32)
    save_file({"x": values}, str(tmp_path / "x.safetensors"))
    tensor = paramctl.load(str(tmp_path / "x.safetensors"))["x"]
    for start, stop in [(0, 10_001), (3, 4), (5000, 10_001), (9_999, None), (7, 7), (10_001, None)]:
        got = [c.copy() for c in tensor.chunks(1000, start, stop)]
        want = values[start:stop]
        assert np.array_equal(np.concatenate(got) if got else np.empty(0, np.float32), want)
        assert all(c.size <= 1000 for c in got)


@pytest.fixture
def parallel(monkeypatch):
    """summaries() splits work with a helper process even for small tensors."""
    monkeypatch.setattr(stats, "PARALLEL_BYTES", 0)
    monkeypatch.setattr(stats, "BLOCK", 1024)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")


def test_a_helper_process_takes_half_of_each_large_tensor_and_the_answers_hold(tmp_path, parallel, monkeypatch):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(3)
    arrays = {
        "big": rng.normal(3, 0.01, 100_003).astype(np.float32),  # split mid-way; a large mean
        "special": np.concatenate([rng.normal(0, 1, 9000), [np.nan, np.inf, -np.inf, 0.0]]).astype(np.float32),
        "small": rng.normal(0, 1, 100).astype(np.float32),  # too small to split
        "ints": rng.integers(-5, 5, 50_000).astype(np.int16),
    }
    path = tmp_path / "x.safetensors"
    save_file(arrays, str(path))
    tensors = list(paramctl.load(str(path)))
    assert {t.name: stats.split_point(t) < t.numel for t in tensors} == {
        "big": True,
        "special": True,
        "small": False,
        "ints": True,
    }
    in_memory = tensor_from_array("memory", arrays["big"])  # not read from a file: never split
    assert stats.split_point(in_memory) == in_memory.numel
    forks: list[int] = []
    real_fork = os.fork
    monkeypatch.setattr(os, "fork", lambda: forks.append(1) or real_fork())
    got = list(stats.summaries([*tensors, in_memory]))
    assert forks == [1]
    for t, summary in zip([*tensors, in_memory], got):
        assert_close(summary.row(), reference(arrays.get(t.name, arrays["big"])), rel=1e-9)
    # the split is deterministic: the same numbers come back when both halves are computed here
    halves = [stats.summarize(t, stop=stats.split_point(t)) for t in tensors]
    for half, t in zip(halves, tensors):
        half.merge(stats.summarize(t, start=stats.split_point(t)))
    assert [h.row() for h in halves] == [g.row() for g in got[:4]]


def test_an_error_in_the_helpers_half_is_a_clean_error(tmp_path, parallel):
    from safetensors.numpy import save_file

    path = tmp_path / "x.safetensors"
    save_file({"a": np.zeros(50_000, np.float32), "b": np.ones(50_000, np.float32)}, str(path))
    tensors = list(paramctl.load(str(path)))
    with open(path, "r+b") as f:  # cut the file inside b's second half: the helper's
        f.truncate(path.stat().st_size - 1000)
    found = stats.summaries(tensors)
    assert next(found).row()["mean"] == 0.0
    with pytest.raises(FormatError, match="truncated: tensor 'b' ends early"):
        next(found)


# --- check ---------------------------------------------------------------------------------------


@pytest.fixture
def clean_and_dirty(tmp_path):
    from safetensors.numpy import save_file

    clean = {"a.weight": RNG.normal(0, 1, (4, 3)).astype(np.float32), "a.bias": np.zeros(4, np.float32)}
    dirty = dict(clean, **{"b.weight": np.array([1, np.nan, 2], np.float32)})
    save_file(clean, str(tmp_path / "clean.safetensors"))
    save_file(dirty, str(tmp_path / "dirty.safetensors"))
    return tmp_path / "clean.safetensors", tmp_path / "dirty.safetensors"


def test_check_passes_a_clean_checkpoint(clean_and_dirty):
    clean, _ = clean_and_dirty
    result = run("check", str(clean))
    assert result.exit_code == 0
    assert result.stdout == ""


def test_check_fails_on_nan_naming_the_tensor(clean_and_dirty):
    _, dirty = clean_and_dirty
    result = run("check", str(dirty))
    assert result.exit_code == 1
    assert result.stdout == "b.weight\tnan\t1 NaN of 3\n"
    report = json.loads(run("check", str(dirty), "-f", "json").stdout)
    assert report == {
        "ok": False,
        "checked": 3,
        "failures": [{"name": "b.weight", "rule": "nan", "detail": "1 NaN of 3"}],
    }


def test_check_rules(clean_and_dirty):
    clean, _ = clean_and_dirty
    rules = {r.split("\t")[1] for r in run("check", str(clean), "--max-abs", "0.01").stdout.splitlines()}
    assert rules == {"max-abs"}
    zero = run("check", str(clean), "--no-all-zero")
    assert zero.exit_code == 1 and zero.stdout.startswith("a.bias\tall-zero\t")
    dtype = run("check", str(clean), "--dtype", "bfloat16")
    assert dtype.exit_code == 1 and len(dtype.stdout.splitlines()) == 2
    assert run("check", str(clean), "--dtype", "float32").exit_code == 0
    assert run("check", str(clean), "--dtype", "float33").exit_code == 2


def test_check_expect_catches_renamed_missing_extra_and_reshaped(tmp_path, clean_and_dirty):
    from safetensors.numpy import save_file

    clean, _ = clean_and_dirty
    expect = tmp_path / "expect.json"
    expect.write_text(run("ls", str(clean), "-f", "json").stdout)
    assert run("check", str(clean), "--expect", str(expect)).exit_code == 0
    changed = {
        "a.weight": np.zeros((3, 4), np.float32),  # reshaped
        "a.bias_renamed": np.zeros(4, np.float32),  # renamed: one extra, one missing
    }
    save_file(changed, str(tmp_path / "changed.safetensors"))
    result = run("check", str(tmp_path / "changed.safetensors"), "--expect", str(expect))
    assert result.exit_code == 1
    assert sorted(tuple(line.split("\t")[:2]) for line in result.stdout.splitlines()) == [
        ("a.bias", "missing"),
        ("a.bias_renamed", "extra"),
        ("a.weight", "shape"),
    ]
    save_file({"a.weight": changed["a.weight"].astype(np.float16)}, str(tmp_path / "half.safetensors"))
    rules = {
        line.split("\t")[1]
        for line in run("check", str(tmp_path / "half.safetensors"), "--expect", str(expect)).stdout.splitlines()
    }
    assert rules == {"shape", "dtype", "missing"}


def test_check_bad_expect_file_is_an_error(tmp_path, clean_and_dirty):
    clean, _ = clean_and_dirty
    (tmp_path / "bad.json").write_text("{not json")
    result = run("check", str(clean), "--expect", str(tmp_path / "bad.json"))
    assert result.exit_code == 2
    assert len(result.stderr.splitlines()) == 1
