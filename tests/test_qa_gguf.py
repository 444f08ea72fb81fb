"""QA: a big-endian GGUF (GGUFWriter(endianess=BIG), as llama.cpp writes for s390x) read as
gguf's GGUFReader reads it: plain values byte-swapped, quantized blocks refused (never misread)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import run

import paramctl

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "big.gguf"
    w = gguf.GGUFWriter(str(path), "llama", endianess=gguf.GGUFEndian.BIG)
    w.add_tensor("a", np.arange(6, dtype=np.float32).reshape(2, 3))
    w.add_tensor("b", np.array([1, 256], dtype=np.int32))
    w.add_tensor("h", np.array([1.5, -2.0, 65504.0], dtype=np.float16))
    w.add_tensor("i8", np.array([-3, 7], dtype=np.int8))
    q8 = gguf.quants.quantize(np.ones((1, 32), np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("q", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_big_endian_values_agree_with_gguf_reader(big):
    reader = gguf.GGUFReader(str(big))
    assert reader.byte_order == "S"
    ckpt = paramctl.load(str(big))
    for info in reader.tensors:
        if info.name == "q":
            continue
        expected = np.asarray(info.data).astype(np.asarray(info.data).dtype.newbyteorder("="))
        got = ckpt[info.name].array()
        assert got.dtype == expected.dtype.newbyteorder("<")
        np.testing.assert_array_equal(got, expected.reshape(got.shape))
    # streamed statistics and a converted file see the same values
    result = run("stats", str(big), "^b$")
    assert result.exit_code == 0
    assert result.output.split("\t")[4:8] == ["128.5", "127.5", "1.0", "256.0"]


def test_big_endian_convert_writes_native_values(big, tmp_path):
    from safetensors.numpy import load_file

    out = tmp_path / "x.safetensors"
    result = run("rm", str(big), "^q$", "-o", str(out))  # the quantized row left out
    assert result.exit_code == 0, result.output
    loaded = load_file(str(out))
    np.testing.assert_array_equal(loaded["a"], np.arange(6, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(loaded["b"], [1, 256])
    np.testing.assert_array_equal(loaded["h"], np.array([1.5, -2.0, 65504.0], np.float16))
    np.testing.assert_array_equal(loaded["i8"], [-3, 7])


def test_big_endian_quantized_values_refused(big, tmp_path):
    listed = run("ls", str(big))
    assert listed.exit_code == 0
    assert "q\t[1, 32]\tq8_0\t32\t34" in listed.output
    for args in (("check", str(big)), ("stats", str(big), "^q$")):
        result = run(*args)
        assert result.exit_code == 2, args
        assert "big-endian GGUF file cannot be dequantized" in result.output
    out = tmp_path / "q.safetensors"
    result = run("convert", str(big), str(out), "--dequantize")
    assert result.exit_code == 2
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_an_output_named_gguf_is_refused_not_written_as_another_format(tmp_path):
    """`convert model.pt out.gguf` once wrote a PyTorch zip named out.gguf with exit 0."""
    import torch

    src = tmp_path / "m.pt"
    torch.save({"w": torch.ones(2, 3)}, src)
    out = tmp_path / "out.gguf"
    result = run("convert", str(src), str(out))
    assert result.exit_code == 2
    assert "cannot write gguf (the output's extension .gguf)" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]
    # --to still names the format explicitly, whatever the name
    result = run("convert", str(src), str(out), "--to", "safetensors")
    assert result.exit_code == 0
    assert paramctl.load(str(out)).format == "safetensors"
