"""cast, streamed: every tensor converted once as the writer reads it, losses counted on the way,
ties kept, each output loaded back by its framework's own loader."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from conftest import SAMPLES, run
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from paramctl.cast import convert


@pytest.fixture
def edgy(tmp_path):
    """float32 tensors with values bfloat16/float16 cannot hold, plus a large one (several chunks)."""
    path = tmp_path / "edgy.safetensors"
    rng = np.random.default_rng(1)
    save_file(
        {
            "big": rng.normal(size=(3, 1 << 21)).astype(np.float32),
            "edge": np.array([1e6, 1e-10, -1e-9, 0.0, np.inf, np.nan, 3.0], np.float32),
            "steps": np.arange(6, dtype=np.int64),
        },
        str(path),
    )
    return path


def test_cast_to_bfloat16_matches_ml_dtypes_and_loads_in_safetensors(edgy, tmp_path):
    out = tmp_path / "out.safetensors"
    result = run("cast", str(edgy), "--dtype", "bfloat16", "-o", str(out))
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""  # bfloat16 has float32's range: nothing overflows or vanishes
    source = load_file(str(edgy))
    with safe_open(str(out), "np") as f:
        assert sorted(f.keys()) == ["big", "edge", "steps"]
    import torch
    from safetensors.torch import load_file as load_torch

    got = load_torch(str(out))  # numpy has no bfloat16: compare the bits
    assert got["steps"].dtype == torch.int64  # integers stay as they are
    for name in ("big", "edge"):
        want = source[name].astype(ml_dtypes.bfloat16).view(np.uint16)
        np.testing.assert_array_equal(got[name].view(torch.int16).numpy().view(np.uint16), want)


def test_cast_to_float16_counts_what_overflows(edgy, tmp_path):
    result = run("cast", str(edgy), "edge", "--dtype", "float16", "--dry-run", "-f", "json")
    assert result.exit_code == 0
    assert result.stdout.strip().startswith("[")
    import json

    assert json.loads(result.stdout) == [
        {"name": "edge", "from": "float32", "to": "float16", "beyond": 1, "to_zero": 2}
    ]


def test_ties_stay_tied_after_cast(tmp_path):
    import torch

    out = tmp_path / "half.pt"
    assert run("cast", str(SAMPLES / "shared.pt"), "--dtype", "float16", "-o", str(out)).exit_code == 0
    sd = torch.load(out, weights_only=True)
    assert sd["2.weight"].dtype == torch.float16
    assert sd["2.weight"].data_ptr() == sd["4.weight"].data_ptr()
    assert sd["2.bias"].data_ptr() == sd["4.bias"].data_ptr()
    src = torch.load(SAMPLES / "shared.pt", weights_only=True)
    torch.testing.assert_close(sd["4.weight"], src["4.weight"].half(), rtol=0, atol=0)
    st = tmp_path / "half.safetensors"
    assert run("cast", str(SAMPLES / "shared.pt"), "--dtype", "bfloat16", "-o", str(st)).exit_code == 0
    with safe_open(str(st), "pt") as f:
        assert f.metadata()["4.weight"] == "2.weight"  # one copy, plus the declared alias
    tied = run("tied", str(st), "-f", "json")
    assert '"2.weight", "4.weight"' in tied.stdout


def test_cast_into_hdf5_and_keras_loads(tmp_path):
    import keras

    out = tmp_path / "mlp.weights.h5"
    assert run("cast", str(SAMPLES / "mlp.weights.h5"), "--dtype", "float16", "-o", str(out)).exit_code == 0
    model = keras.Sequential([keras.Input((20,)), keras.layers.Dense(256), keras.layers.Dense(10)])
    model.load_weights(out)
    expected = keras.Sequential([keras.Input((20,)), keras.layers.Dense(256), keras.layers.Dense(10)])
    expected.load_weights(SAMPLES / "mlp.weights.h5")
    for got, want in zip(model.get_weights(), expected.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float8_e4m3fn", "float8_e5m2", "int8", "float64"])
def test_convert_counts_as_the_wide_comparison_does(dtype):
    values = np.array([1e6, -7e4, 1e-10, 0.0, -0.0, np.inf, -np.inf, np.nan, 3.0, 500.0, 1e-3], np.float32)
    out, beyond, to_zero = convert(values, dtype)
    target = np.dtype(getattr(ml_dtypes, dtype, None) or dtype)
    with np.errstate(all="ignore"):
        wide = values.astype(np.float64)
        cast = values.astype(target).astype(np.float64)
    if target.kind in "iu":
        info = np.iinfo(target)
        assert beyond == np.count_nonzero(~((wide >= info.min) & (wide <= info.max)))
    else:
        assert beyond == np.count_nonzero(np.isfinite(wide) & ~np.isfinite(cast))
        assert to_zero == np.count_nonzero((wide != 0) & (cast == 0))
    assert out.dtype == target


def test_convert_dtype_is_the_same_streamed_cast(edgy, tmp_path):
    out = tmp_path / "out.safetensors"
    result = run("convert", str(edgy), str(out), "--dtype", "float16")
    assert result.exit_code == 0
    assert result.stderr == (
        "paramctl: warning: edge: 1 value(s) beyond the range of float16 (-65504 to 65504)\n"
        "paramctl: warning: edge: 2 non-zero value(s) become 0 in float16\n"
    )
    got, source = load_file(str(out)), load_file(str(edgy))
    with np.errstate(all="ignore"):
        np.testing.assert_array_equal(got["big"], source["big"].astype(np.float16))
        np.testing.assert_array_equal(got["edge"], source["edge"].astype(np.float16))
    assert got["steps"].dtype == np.int64
