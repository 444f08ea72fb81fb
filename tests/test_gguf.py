"""GGUF files written by llama.cpp's own `gguf` package, read back against its GGUFReader + dequantize."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from conftest import run

import paramctl

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import quants  # noqa: E402

QUANTIZED = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.BF16)


def write_gguf(path, extra=(), nan=False):
    """A small llama-like GGUF: F32, F16, every type the package can quantize, and EXTRA raw rows."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(128)
    w.add_name("tiny")
    w.add_token_list([f"tok{i}" for i in range(40)])
    embd = rng.standard_normal((8, 64)).astype(np.float32)
    if nan:
        embd[3, 5] = np.nan
    w.add_tensor("token_embd.weight", embd)
    w.add_tensor("blk.0.attn_norm.weight", rng.standard_normal(64).astype(np.float16))
    for qt in QUANTIZED:
        w.add_tensor(f"blk.0.{qt.name.lower()}.weight", quants.quantize(rng.standard_normal((4, 64)), qt), raw_dtype=qt)
    for name, qt, raw in extra:
        w.add_tensor(name, raw, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def reference(path):
    """name -> (numpy shape, GGML type name, float32 values or None) as the gguf package reads them."""
    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        try:
            values = np.asarray(quants.dequantize(t.data, t.tensor_type), np.float32).reshape(shape)
        except NotImplementedError:
            values = None
        out[t.name] = (shape, t.tensor_type.name, values)
    return out


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    rng = np.random.default_rng(1)
    q6k = rng.integers(0, 255, (2, 210), dtype=np.uint8)  # raw Q6_K blocks: the package cannot quantize it
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", [("blk.1.q6_k.weight", Q.Q6_K, q6k)])


def test_rows_and_values_agree_with_the_gguf_package(model):
    expected = reference(model)
    ckpt = paramctl.load(str(model))
    assert ckpt.format == "gguf"
    assert ckpt.names() == list(expected)
    for t in ckpt:
        shape, ggml, values = expected[t.name]
        assert t.shape == shape and t.attrs["ggml_type"] == ggml
        np.testing.assert_array_equal(np.asarray(t.array(), np.float32), values)
        # streamed chunks (a few rows at a time) give the same values as the whole array
        streamed = np.concatenate([np.asarray(c, np.float32) for c in t.chunks(elements=64)])
        np.testing.assert_array_equal(streamed, values.reshape(-1))


def test_ls_shows_ggml_types_and_stored_sizes(model):
    rows = json.loads(run("ls", str(model), "-f", "json").stdout)
    by_name = {r["name"]: r for r in rows}
    assert by_name["token_embd.weight"] == {
        "name": "token_embd.weight",
        "shape": [8, 64],
        "dtype": "float32",
        "numel": 512,
        "nbytes": 2048,
    } | ({"tie": None} if "tie" in by_name["token_embd.weight"] else {})
    assert by_name["blk.0.q8_0.weight"]["dtype"] == "q8_0"
    assert by_name["blk.0.q8_0.weight"]["nbytes"] == 4 * 2 * 34  # 4 rows of 2 blocks of 34 bytes
    assert by_name["blk.0.bf16.weight"]["dtype"] == "bfloat16"
    assert by_name["blk.1.q6_k.weight"]["shape"] == [2, 256] and by_name["blk.1.q6_k.weight"]["nbytes"] == 420


def test_info_shows_metadata_and_types_by_count(model):
    info = json.loads(run("info", str(model), "-f", "json").stdout)
    assert info["format"] == "gguf"
    entries = info["entries"]
    assert entries["general.architecture"] == "llama"
    assert entries["llama.block_count"] == 2
    assert entries["general.name"] == "tiny"
    assert entries["tokenizer.ggml.tokens"] == "[40 string values]"
    assert entries["ggml_types"] == {
        "BF16": 1,
        "F16": 1,
        "F32": 1,
        "Q4_0": 1,
        "Q4_1": 1,
        "Q5_0": 1,
        "Q5_1": 1,
        "Q6_K": 1,
        "Q8_0": 1,
    }


def test_stats_are_over_dequantized_values(model):
    rows = {r["name"]: r for r in json.loads(run("stats", str(model), "-f", "json").stdout)}
    for name, (_, _, values) in reference(model).items():
        v = values.astype(np.float64)
        assert rows[name]["max"] == pytest.approx(v.max())
        assert rows[name]["mean"] == pytest.approx(v.mean(), abs=1e-9)
        assert rows[name]["norm"] == pytest.approx(np.linalg.norm(v))


def test_a_type_the_package_cannot_dequantize_is_refused_naming_the_tensor(tmp_path):
    raw = np.zeros((2, 80), np.uint8)  # Q8_1: listed, never dequantized by the package
    path = write_gguf(tmp_path / "q81.gguf", [("blk.1.q8_1.weight", Q.Q8_1, raw)])
    assert run("ls", str(path)).exit_code == 0
    for command in ("stats", "check"):
        result = run(command, str(path))
        assert result.exit_code == 2
        assert "'blk.1.q8_1.weight'" in result.stderr and "cannot dequantize q8_1" in result.stderr
    assert run("stats", str(path), "-x", "q8_1").exit_code == 0


def test_check_finds_a_nan(tmp_path):
    path = write_gguf(tmp_path / "nan.gguf", nan=True)
    result = run("check", str(path))
    assert result.exit_code == 1 and "token_embd.weight" in result.stdout


def test_convert_refuses_quantized_rows_unless_dequantized(tmp_path, model):
    from safetensors.numpy import load_file

    out = tmp_path / "out.safetensors"
    refused = run("convert", str(model), str(out))
    assert refused.exit_code == 2 and "--dequantize" in refused.stderr and not out.exists()
    done = run("convert", str(model), str(out), "--dequantize")
    assert done.exit_code == 0, done.stderr
    loaded = load_file(str(out))
    for name, (_, ggml, values) in reference(model).items():
        assert loaded[name].dtype == (np.float16 if ggml == "F16" else np.float32) or ggml == "BF16"
        np.testing.assert_array_equal(loaded[name].astype(np.float32), values)
    assert run("diff", str(model), str(out)).exit_code in (0, 1)  # dtypes differ for quantized rows


def test_float_only_gguf_converts_to_pt_without_dequantize(tmp_path):
    import torch

    w = gguf.GGUFWriter(str(tmp_path / "f.gguf"), "llama")
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    w.add_tensor("w", x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    result = run("convert", str(tmp_path / "f.gguf"), str(tmp_path / "f.pt"))
    assert result.exit_code == 0, result.stderr
    assert torch.equal(torch.load(tmp_path / "f.pt")["w"], torch.from_numpy(x))


def hostile_cases(good: bytes) -> dict[str, bytes]:
    header = struct.pack("<4sIQQ", b"GGUF", 3, 1, 0)
    return {
        "truncated": good[: len(good) // 2],
        "huge tensor count": b"GGUF" + struct.pack("<IQQ", 3, 2**62, 0) + b"\0" * 64,
        "huge kv count": b"GGUF" + struct.pack("<IQQ", 3, 0, 2**62) + b"\0" * 64,
        "version 1": b"GGUF" + struct.pack("<IQQ", 1, 0, 0),
        "name longer than the file": header + struct.pack("<Q", 2**40) + b"x" * 16,
        "tensor past the end": good[:-64],
    }


@pytest.mark.parametrize("case", list(hostile_cases(b"GGUF" + b"\0" * 64)))
def test_hostile_files_are_one_line_errors(tmp_path, model, case):
    path = tmp_path / "bad.gguf"
    path.write_bytes(hostile_cases(model.read_bytes())[case])
    for command in ("ls", "stats", "info"):
        result = run(command, str(path))
        assert result.exit_code == 2, (case, command, result.stdout)
        assert result.stderr.count("\n") == 1 and str(path) in result.stderr and "internal error" not in result.stderr
