"""The command line on the bundled samples: output modes, selection, stdin, exit codes, help."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import FIXTURES, SAMPLES, run

from paramctl.cli import cli
from paramctl.commands.inspect import tree_rows

MLP_ROWS = [
    ["0.weight", "[256, 20]", "float32", "5120", "20480"],
    ["0.bias", "[256]", "float32", "256", "1024"],
    ["2.weight", "[10, 256]", "float32", "2560", "10240"],
    ["2.bias", "[10]", "float32", "10", "40"],
]


def tsv(result) -> list[list[str]]:
    return [line.split("\t") for line in result.stdout.splitlines()]


def test_ls_piped_is_plain_rows_without_header():
    result = run("ls", str(SAMPLES / "mlp.pt"))
    assert result.exit_code == 0
    assert tsv(result) == MLP_ROWS
    assert result.stderr == ""


def test_ls_pattern_searches_names_like_grep():
    assert [r[0] for r in tsv(run("ls", str(SAMPLES / "mlp.pt"), ".*weight"))] == ["0.weight", "2.weight"]
    assert [r[0] for r in tsv(run("ls", str(SAMPLES / "mlp.pt"), "bias"))] == ["0.bias", "2.bias"]
    assert [r[0] for r in tsv(run("ls", str(SAMPLES / "mlp.pt"), "^0"))] == ["0.weight", "0.bias"]
    excluded = run("ls", str(SAMPLES / "mlp.pt"), "--exclude", "bias", "-x", "^2")
    assert [r[0] for r in tsv(excluded)] == ["0.weight"]


def test_ls_the_issue_pipeline_with_cut():
    """`paramctl ls sample_checkpoints/mlp.pt '.*weight' | cut -f1` prints 0.weight and 2.weight."""
    out = subprocess.run(
        f"{sys.executable} -m paramctl ls {SAMPLES / 'mlp.pt'} '.*weight' | cut -f1",
        shell=True,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout == "0.weight\n2.weight\n"


def test_ls_reads_standard_input():
    data = (SAMPLES / "mlp.pt").read_bytes()
    out = subprocess.run([sys.executable, "-m", "paramctl", "ls", "-"], input=data, capture_output=True, check=True)
    assert len(out.stdout.decode().splitlines()) == 4


def test_ls_output_formats_agree():
    path = str(SAMPLES / "mlp.pt")
    as_json = json.loads(run("ls", path, "--format", "json").stdout)
    first = {"name": "0.weight", "shape": [256, 20], "dtype": "float32", "numel": 5120, "nbytes": 20480, "tie": None}
    assert as_json[0] == first
    as_jsonl = [json.loads(line) for line in run("ls", path, "-f", "jsonl").stdout.splitlines()]
    assert as_jsonl == as_json
    csv_lines = run("ls", path, "-f", "csv").stdout.splitlines()
    assert csv_lines[0] == "name,shape,dtype,numel,nbytes"
    assert csv_lines[1] == '0.weight,"[256, 20]",float32,5120,20480'
    assert [r[0] for r in tsv(run("ls", path, "-f", "tsv"))] == [r["name"] for r in as_json]


def test_ls_table_on_a_terminal_has_header_and_totals():
    result = run("ls", str(SAMPLES / "shared.pt"), tty=True)
    lines = result.stdout.splitlines()
    assert lines[1].split() == ["name", "shape", "dtype", "numel", "nbytes", "tie"]
    assert lines[6].split() == ["4.weight", "[8,", "8]", "float32", "64", "256", "B", "2.weight"]
    assert "tie" not in run("ls", str(SAMPLES / "mlp.pt"), tty=True).stdout  # no ties, no column
    # the shared Linear counts once: 32+8+64+8+8+1 parameters, 484 bytes
    assert lines[-1].split() == ["8", "tensors", "121", "484", "B"]


def test_ls_pattern_matching_nothing_is_an_error():
    result = run("ls", str(SAMPLES / "mlp.pt"), "nothing-matches", "-f", "json")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr == f"paramctl: error: {SAMPLES / 'mlp.pt'}: no tensor matches 'nothing-matches'\n"


def test_invalid_pattern_is_a_usage_error():
    result = run("ls", str(SAMPLES / "mlp.pt"), "(")
    assert result.exit_code == 2
    assert result.stderr.startswith("paramctl: error: invalid pattern '('")
    assert len(result.stderr.splitlines()) == 1


def test_tree_counts_per_subtree():
    rows = json.loads(run("tree", str(SAMPLES / "nested.pt"), "--depth", "2", "-f", "json").stdout)
    assert rows[0] == {"path": "0", "depth": 1, "tensors": 16, "numel": 304, "nbytes": 1216}
    assert rows[1] == {"path": "0.block 0", "depth": 2, "tensors": 4, "numel": 76, "nbytes": 304}
    assert [r["path"] for r in rows] == [
        "0",
        "0.block 0",
        "0.block 1",
        "0.block 2",
        "0.block 3",
        "1",
        "1.weight",
        "1.bias",
    ]


def test_tree_splits_on_slash_and_groups_interleaved_names():
    from paramctl.table import Storage, Tensor

    names = ["a/x/kernel", "b.y", "a/x/bias", "a/z"]
    tensors = [Tensor(n, (2,), "float32", Storage(8, buffer=bytes(8))) for n in names]
    rows = tree_rows(tensors, None)
    assert [(r["path"], r["tensors"]) for r in rows] == [
        ("a", 3),
        ("a/x", 2),
        ("a/x/kernel", 1),
        ("a/x/bias", 1),
        ("a/z", 1),
        ("b", 1),
        ("b.y", 1),
    ]


def test_tree_table_indents_labels():
    out = run("tree", str(SAMPLES / "nested.pt"), "--depth", "2", tty=True).stdout
    assert "\n  block 0 " in out


def test_info_json():
    info = json.loads(run("info", str(SAMPLES / "shared.pt"), "-f", "json").stdout)
    assert info["format"] == "pt"
    assert info["tensors"] == 8
    assert info["parameters"] == 121
    assert info["tie_groups"] == [["2.weight", "4.weight"], ["2.bias", "4.bias"]]
    assert info["dtypes"] == {"float32": {"tensors": 6, "bytes": 484}}  # a tie counts once
    assert info["file_size"] == (SAMPLES / "shared.pt").stat().st_size


def test_info_safetensors_shows_metadata():
    info = json.loads(run("info", str(SAMPLES / "mlp.safetensors"), "-f", "json").stdout)
    assert info["metadata"] == {"format": "pt"}
    plain = run("info", str(SAMPLES / "mlp.safetensors")).stdout
    assert "format\tsafetensors" in plain.splitlines()


def test_show_index_and_json():
    import torch

    weight = torch.load(SAMPLES / "mlp.pt")["0.weight"]
    shown = json.loads(run("show", str(SAMPLES / "mlp.pt"), "0.weight", "[0, :5]", "-f", "json").stdout)
    assert shown["values"] == weight[0, :5].double().tolist()
    assert shown["shape"] == [256, 20]
    text = run("show", str(SAMPLES / "mlp.pt"), "0.bias", "[-2:]").stdout
    assert text.startswith("[") and len(text.split(",")) == 2


@pytest.mark.parametrize("index", ["[0; 1]", "[__import__('os')]", "[0, 1, 2]", "[999]"])
def test_show_rejects_bad_indexes(index):
    result = run("show", str(SAMPLES / "mlp.pt"), "0.weight", index)
    assert result.exit_code == 2
    assert len(result.stderr.splitlines()) == 1


def test_show_unknown_tensor():
    result = run("show", str(SAMPLES / "mlp.pt"), "nope")
    assert result.exit_code == 2
    assert "no tensor named 'nope'" in result.stderr


def test_missing_file_is_one_line_exit_2():
    result = run("ls", "/nonexistent/model.pt")
    assert result.exit_code == 2
    assert result.stderr == "paramctl: error: /nonexistent/model.pt: no such file or directory\n"


def test_convert_refuses_binary_to_a_terminal(tmp_path):
    result = run("convert", str(SAMPLES / "mlp.pt"), "-", "--to", "safetensors", tty=True)
    assert result.exit_code == 2
    assert "terminal" in result.stderr
    assert result.stdout == ""


def test_convert_to_stdout_when_piped(tmp_path):
    from safetensors.torch import load_file

    out = subprocess.run(
        [sys.executable, "-m", "paramctl", "convert", str(SAMPLES / "mlp.pt"), "-", "--to", "safetensors"],
        capture_output=True,
        check=True,
    )
    (tmp_path / "x.safetensors").write_bytes(out.stdout)
    assert sorted(load_file(tmp_path / "x.safetensors")) == ["0.bias", "0.weight", "2.bias", "2.weight"]


def test_convert_dtype_casts_floating_tensors(tmp_path):
    import torch

    out = tmp_path / "half.safetensors"
    assert run("convert", str(SAMPLES / "shared.pt"), str(out), "--dtype", "bfloat16").exit_code == 0
    rows = json.loads(run("ls", str(out), "-f", "json").stdout)
    assert {r["dtype"] for r in rows} == {"bfloat16"}
    back = tmp_path / "back.pt"
    assert run("convert", str(out), str(back)).exit_code == 0
    sd = torch.load(back)
    assert sd["2.weight"].data_ptr() == sd["4.weight"].data_ptr()  # the tie survived the cast
    expected = torch.load(SAMPLES / "shared.pt")["0.weight"].to(torch.bfloat16)
    assert torch.equal(sd["0.weight"], expected)


def test_every_command_has_help_with_an_example():
    for name, command in cli.commands.items():
        result = run(name, "--help")
        assert result.exit_code == 0, name
        assert "Example" in result.stdout, f"{name} --help has no example"
        assert command.help


def test_cli_help_is_fast_to_import():
    """`paramctl --help` must not import torch, numpy, h5py or rich."""
    code = (
        "import sys, runpy; sys.argv = ['paramctl', '--help']\n"
        "try: runpy.run_module('paramctl', run_name='__main__')\n"
        "except SystemExit: pass\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy', 'h5py', 'rich', 'keras'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[-1] == "[]"


def reference_listing(path) -> list[tuple[str, list[int], str]]:
    """(name, shape, dtype) as the real library reads PATH: torch, safetensors or h5py."""
    import h5py
    import torch
    from safetensors import safe_open

    if path.suffix == ".pt":
        return [(k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in torch.load(path).items()]
    if path.suffix == ".safetensors":
        with safe_open(path, "pt") as f:
            return [(k, list(f.get_slice(k).get_shape()), str(f.get_slice(k).get_dtype())) for k in f.keys()]  # noqa: SIM118
    if path.suffix == ".keras":
        import io
        import zipfile

        with zipfile.ZipFile(path) as zf:
            path = io.BytesIO(zf.read("model.weights.h5"))
    found = []
    with h5py.File(path, "r") as f:
        f.visititems(
            lambda name, obj: (
                found.append((name, list(obj.shape), str(obj.dtype))) if isinstance(obj, h5py.Dataset) else None
            )
        )
    return found


SAFETENSORS_DTYPES = {"F32": "float32", "I64": "int64"}


@pytest.mark.parametrize(
    "path",
    sorted(p for p in SAMPLES.iterdir() if p.suffix != ".py") + sorted(FIXTURES.glob("*.h5")),
    ids=lambda p: p.name,
)
def test_ls_json_equals_the_real_reader(path):
    rows = json.loads(run("ls", str(path), "-f", "json").stdout)
    ours = sorted((r["name"], r["shape"], r["dtype"]) for r in rows)
    theirs = sorted((n, s, SAFETENSORS_DTYPES.get(d, d)) for n, s, d in reference_listing(path))
    assert ours == theirs


@pytest.mark.parametrize(
    "args",
    [("ls",), ("tree", str(SAMPLES / "mlp.pt"), "--depth", "-1"), ("convert", "a", "b", "--to", "bogus")],
)
def test_usage_errors_are_one_line_with_exit_2(args):
    result = run(*args)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("paramctl: error: ")
    assert f"see 'paramctl {args[0]} --help'" in result.stderr
