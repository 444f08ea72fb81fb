"""TensorFlow checkpoints (tensor bundles) read and written without TensorFlow.

The quick path reads the committed fixtures (tests/fixtures/tf, made by TensorFlow 2.15 with
make_fixtures.py) against the values TensorFlow gave for them. With .venv-tf, fresh checkpoints
are made by TensorFlow, edited by paramctl, and every output is loaded back by
tf.train.load_checkpoint, Keras load_weights and tf.train.Checkpoint.restore in one subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, run
from reference import run_in

import paramctl
from paramctl.formats import _sstable, tf
from paramctl.table import Checkpoint, tensor_from_array

TF_FIXTURES = FIXTURES / "tf"
KINDS = ["mlp", "legacy", "manager", "train", "dtypes", "shards", "partitioned"]
FRESH_KINDS = [
    *KINDS,
    "saved_model",
]  # a Keras 2 SavedModel directory: made by the tests, not committed (70 KB of graph)


def expected(where: Path) -> dict:
    return json.loads((where / "expected.json").read_text())


def rows_of(path: str) -> list[dict]:
    result = run("ls", path, "-f", "json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def assert_same_as_tf(path: str, tensors: dict) -> None:
    """paramctl's rows and values at PATH equal TensorFlow's (TENSORS: key -> dtype, shape, hex)."""
    numeric = {k: v for k, v in tensors.items() if v["dtype"] != "string"}
    rows = rows_of(path)
    assert [r["name"] for r in rows] == sorted(numeric)
    assert {r["name"]: (r["shape"], r["dtype"]) for r in rows} == {
        k: (v["shape"], v["dtype"]) for k, v in numeric.items()
    }
    ckpt = paramctl.load(path)
    assert {t.name: bytes(t.tobytes()).hex() for t in ckpt.tensors} == {k: v["hex"] for k, v in numeric.items()}
    strings = {s.key: [v.hex() for v in s.values()] for s in ckpt.extra.strings}
    assert strings == {k: v["strings"] for k, v in tensors.items() if v["dtype"] == "string"}


# --- the committed fixtures, without TensorFlow --------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_fixture_rows_and_values_equal_tensorflows(kind):
    where = TF_FIXTURES / kind
    exp = expected(where)
    prefix = str(where / exp["prefix"])
    assert [r["name"] for r in rows_of(prefix)] == [k for k, _ in exp["list_variables"] if not is_string(exp, k)]
    assert_same_as_tf(prefix, exp["tensors"])


def is_string(exp: dict, key: str) -> bool:
    return exp["tensors"][key]["dtype"] == "string"


def test_addressed_as_prefix_index_directory_or_state_file():
    where = TF_FIXTURES / "manager"  # CheckpointManager kept ckpt-2 and ckpt-3; the state file names ckpt-3
    listings = [rows_of(str(p)) for p in (where / "ckpt-3", where / "ckpt-3.index", where, where / "checkpoint")]
    assert all(rows == listings[0] for rows in listings)
    assert paramctl.load(str(where)).extra.prefix == str(where / "ckpt-3")
    assert rows_of(str(TF_FIXTURES / "dtypes")) == rows_of(
        str(TF_FIXTURES / "dtypes" / "ckpt")
    )  # one bundle, no state file
    values = {t.name: t.array() for t in paramctl.load(str(where / "ckpt-2"))}
    latest = {t.name: t.array() for t in paramctl.load(str(where))}
    bias = "model/layer_with_weights-1/bias/.ATTRIBUTES/VARIABLE_VALUE"
    assert latest[bias] == values[bias] + 1  # each save added 1 to the bias


def test_info_shows_the_string_entries_and_the_sniffed_format():
    result = run("info", str(TF_FIXTURES / "dtypes" / "ckpt"), "-f", "json")
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["format"] == "tf"
    assert info["entries"]["_CHECKPOINTABLE_OBJECT_GRAPH"] == {"object_graph": {"nodes": 19, "bytes": 1373}}
    assert info["entries"]["words/.ATTRIBUTES/VARIABLE_VALUE"] == {
        "dtype": "string",
        "shape": [3],
        "values": ["alpha", "", "gamma\x00delta"],
    }
    partitioned = paramctl.load(str(TF_FIXTURES / "partitioned"))
    assert tf.entries(partitioned) == {"partitioned": ["s/part"]}


def test_listing_imports_no_framework_and_no_numpy():
    import subprocess
    import sys

    code = (
        "import sys, runpy; sys.argv = ['paramctl', 'ls', sys.argv[1]]\n"
        "try: runpy.run_module('paramctl', run_name='__main__')\n"
        "except SystemExit: pass\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'torch', 'numpy', 'h5py', 'keras'}))"
    )
    for path in (TF_FIXTURES / "manager", TF_FIXTURES / "dtypes" / "ckpt.index"):
        out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
        assert out.stdout.splitlines()[-1] == "[]", out.stdout


def test_partitioned_variable_slice_keys_are_tensorflows():
    index = (TF_FIXTURES / "partitioned" / "model.index").read_bytes()
    keys = [k for k, _ in _sstable.read_table(index)]
    made = [tf.slice_key("s/part", [(start, 2), (0, 2)]).encode("latin-1") for start in (0, 2, 4)]
    assert [k for k in keys if k.startswith(b"\x00")] == made
    assert tf._signed_num_increasing(-1) == b"\x7f"
    assert tf._signed_num_increasing(64) == b"\xc0\x40"
    assert tf._signed_num_increasing(-65) == b"\x3f\xbf"


def test_crc32c_table_and_lanes_agree():
    assert _sstable.crc32c(b"123456789") == 0xE3069283
    data = np.random.default_rng(0).integers(0, 256, 300_001, dtype=np.uint8).tobytes()
    register = 0xFFFFFFFF
    for b in data:
        register = _sstable.TABLE[(register ^ b) & 0xFF] ^ (register >> 8)
    assert _sstable.crc32c(data) == register ^ 0xFFFFFFFF
    assert _sstable.mask(0) == 0xA282EAD8


def copy_fixture(kind: str, tmp_path: Path) -> Path:
    target = tmp_path / kind
    shutil.copytree(TF_FIXTURES / kind, target)
    return target


def error_of(*args: str) -> str:
    result = run(*args)
    assert result.exit_code == 2, result.stdout
    errors = [line for line in result.stderr.splitlines() if not line.startswith("paramctl: warning:")]
    assert len(errors) == 1 and errors[0].startswith("paramctl: error: "), result.stderr
    return errors[0]


def test_corrupt_data_is_refused_naming_the_tensor_when_values_are_read(tmp_path):
    where = copy_fixture("shards", tmp_path)
    data = where / "ckpt.data-00001-of-00002"  # b = [7, 8, 9]
    raw = bytearray(data.read_bytes())
    raw[0] ^= 1
    data.write_bytes(bytes(raw))
    assert [r["name"] for r in rows_of(str(where / "ckpt"))] == ["a", "b"]  # listing reads no data
    message = error_of("stats", str(where / "ckpt"))
    assert "checksum mismatch in tensor 'b'" in message
    assert run("stats", str(where / "ckpt"), "^a$").exit_code == 0


def test_corrupt_index_block_and_other_hostile_bundles(tmp_path):
    where = copy_fixture("mlp", tmp_path)
    index = where / "ckpt.index"
    good = index.read_bytes()
    raw = bytearray(good)
    raw[20] ^= 0x40
    index.write_bytes(bytes(raw))
    assert "checksum mismatch" in error_of("ls", str(where / "ckpt"))
    index.write_bytes(good[:-60] + good[-48:])  # blocks cut short
    assert error_of("ls", str(where / "ckpt"))
    (where / "ckpt.data-00000-of-00001").unlink()
    index.write_bytes(good)
    assert "data file ckpt.data-00000-of-00001 is missing" in error_of("ls", str(where / "ckpt"))
    (where / "checkpoint").write_text('model_checkpoint_path: "gone"\n')
    assert "gone.index is missing" in error_of("ls", str(where))


def test_snappy_blocks_and_foreign_dtypes_are_refused(tmp_path):
    # a bundle written by paramctl, its data block re-marked as snappy-compressed (CRC made to match)
    out = tmp_path / "x"
    ckpt = Checkpoint("mem", "tf", [tensor_from_array("w", np.arange(3, dtype=np.float32))])
    tf.save(ckpt, str(out))
    raw = bytearray((tmp_path / "x.index").read_bytes())
    footer = raw[-48:]
    (_, _), pos = _sstable._handle(footer, 0)
    (index_offset, index_size), _ = _sstable._handle(footer, pos)
    block_end = next(iter(_sstable._block_entries(memoryview(raw)[index_offset : index_offset + index_size])))[1]
    (offset, size), _ = _sstable._handle(block_end, 0)
    raw[offset + size] = 1
    raw[offset + size + 1 : offset + size + 5] = _sstable.mask(
        _sstable.crc32c(raw[offset : offset + size + 1])
    ).to_bytes(4, "little")
    (tmp_path / "x.index").write_bytes(bytes(raw))
    assert "snappy-compressed" in error_of("ls", str(out))
    table = _sstable.TableWriter()
    table.add(b"", tf.HEADER)
    table.add(b"handle", tf.entry_proto(20, (), 0, 0, _sstable.mask(0)))  # DT_RESOURCE
    (tmp_path / "r.index").write_bytes(table.finish())
    (tmp_path / "r.data-00000-of-00001").write_bytes(b"")
    assert "tensor 'handle' has dtype resource, which paramctl does not read" in error_of("ls", str(tmp_path / "r"))


def test_paramctl_writes_what_it_reads(tmp_path):
    """Every dtype round-trips through paramctl's writer (TensorFlow checks it below)."""
    source = TF_FIXTURES / "dtypes" / "ckpt"
    out = tmp_path / "copy" / "ckpt"
    assert run("convert", str(source), str(out)).exit_code == 0
    assert_same_as_tf(str(out), expected(TF_FIXTURES / "dtypes")["tensors"])
    assert sorted(os.listdir(out.parent)) == ["ckpt.data-00000-of-00001", "ckpt.index"]
    # into a directory: the source's prefix name plus a `checkpoint` state file naming it
    result = run("convert", str(TF_FIXTURES / "shards"), str(tmp_path / "dir") + "/")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "dir" / "checkpoint").read_text() == (
        'model_checkpoint_path: "ckpt"\nall_model_checkpoint_paths: "ckpt"\n'
    )
    assert_same_as_tf(str(tmp_path / "dir"), expected(TF_FIXTURES / "shards")["tensors"])


def test_in_place_edit_of_a_sharded_checkpoint_leaves_one_shard(tmp_path):
    where = copy_fixture("shards", tmp_path)
    result = run("set", str(where / "ckpt"), "b[0]", "70", "--in-place")
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in where.glob("ckpt.*")) == ["ckpt.data-00000-of-00001", "ckpt.index", "ckpt.meta"]
    values = {t.name: t.array().tolist() for t in paramctl.load(str(where / "ckpt"))}
    assert values == {"a": [[0, 1, 2], [3, 4, 5]], "b": [70, 8, 9]}


def test_conversion_losses_are_said(tmp_path):
    source = tmp_path / "m.safetensors"
    result = run("convert", str(TF_FIXTURES / "mlp"), str(source))
    assert result.exit_code == 0
    assert "dropping 1 non-tensor entries (_CHECKPOINTABLE_OBJECT_GRAPH)" in result.stderr
    result = run("convert", str(source), str(tmp_path / "out" / "model"), "--to", "tf")
    assert result.exit_code == 0
    assert "no object graph" in result.stderr
    assert rows_of(str(tmp_path / "out" / "model")) == rows_of(str(TF_FIXTURES / "mlp"))
    assert "several files" in error_of("convert", str(source), "-", "--to", "tf")


def test_rename_updates_the_object_graph(tmp_path):
    out = tmp_path / "r" / "ckpt"
    assert run("rename", str(TF_FIXTURES / "mlp"), "s/layer_with_weights-0/first/", "-o", str(out)).exit_code == 0
    graph = next(s for s in paramctl.load(str(out)).extra.strings if s.key == tf.OBJECT_GRAPH).values()[0]
    assert b"first/kernel/.ATTRIBUTES/VARIABLE_VALUE" in graph
    assert b"layer_with_weights-0/kernel/.ATTRIBUTES" not in graph


def test_keras_layout_for_fans():
    result = run("reinit", str(TF_FIXTURES / "mlp"), "--init", "xavier", "--dry-run")
    assert result.exit_code == 0
    assert "layout keras" in result.stderr
    line = next(x for x in result.stderr.splitlines() if "layer_with_weights-1/kernel" in x)
    assert line.split()[-4:] == ["weight", "xavier_uniform(gain=1.0)", "4", "1"]  # (in, out) = (4, 1)


FUZZ_CASES = 2000 if os.environ.get("PARAMCTL_FUZZ") == "long" else 150


@pytest.mark.parametrize("kind", ["mlp", "dtypes", "partitioned", "shards"])
def test_mutated_bundles_are_read_or_refused_in_one_line(kind, tmp_path):
    """Entries and keys mutated and the index rebuilt with valid block CRCs, so that the damage
    reaches the protobuf, shape, slice and data checks: every case is a table or a FormatError."""
    import random

    rng = random.Random(kind)
    prefix = expected(TF_FIXTURES / kind)["prefix"]
    entries = list(_sstable.read_table((TF_FIXTURES / kind / f"{prefix}.index").read_bytes()))
    where = copy_fixture(kind, tmp_path)
    outcomes = {"table": 0, "error": 0}
    for _ in range(FUZZ_CASES):
        mutated = list(entries)
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(mutated))
            key, value = mutated[i]
            mutated[i] = (key, mutate(rng, value)) if rng.random() < 0.8 else (mutate(rng, key), value)
        table = _sstable.TableWriter()
        for key, value in mutated:
            table.add(key, value)
        (where / f"{prefix}.index").write_bytes(table.finish())
        try:
            ckpt = paramctl.load(str(where / prefix))
            tf.entries(ckpt)
            for t in ckpt.tensors:
                t.array()
            outcomes["table"] += 1
        except paramctl.FormatError as e:
            assert "\n" not in str(e)
            outcomes["error"] += 1
    assert outcomes["error"] > 0


def mutate(rng, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        op = rng.random()
        if op < 0.5 and out:
            out[rng.randrange(len(out))] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])
        elif op < 0.7:
            del out[rng.randrange(len(out) + 1) :]
        else:
            at = rng.randrange(len(out) + 1)
            out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 6)))
    return bytes(out)


# --- against TensorFlow 2.15 --------------------------------------------------------------------

CHECK = r"""
import json, os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import tensorflow as tf


def d2l_mlp(legacy):
    net = tf.keras.Sequential(
        [tf.keras.layers.Flatten(), tf.keras.layers.Dense(4, activation=tf.nn.relu), tf.keras.layers.Dense(1)]
    )
    x = tf.zeros((2, 4))
    net(x)
    opt = (tf.keras.optimizers.legacy.Adam if legacy else tf.keras.optimizers.Adam)(0.01)
    net.compile(optimizer=opt, loss="mse")
    net.train_on_batch(x, tf.ones((2, 1)))  # the optimizer's variables exist before restoring
    return net, opt


def error(e):
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"


def tensors(prefix):
    reader = tf.train.load_checkpoint(prefix)
    dtypes = reader.get_variable_to_dtype_map()
    out = {}
    for key, shape in tf.train.list_variables(prefix):
        value = reader.get_tensor(key)
        if dtypes[key] == tf.string:
            items = [value] if not hasattr(value, "shape") or value.shape == () else list(value.reshape(-1))
            out[key] = {"dtype": "string", "shape": shape, "strings": [bytes(v).hex() for v in items]}
        else:
            out[key] = {"dtype": dtypes[key].name, "shape": shape, "hex": value.tobytes().hex()}
    return out


results = {}
for name, job in json.loads(sys.argv[1]).items():
    r = results[name] = {}
    try:
        r["tensors"] = tensors(job["prefix"])
    except Exception as e:
        r["tensors"] = error(e)
    if job.get("model"):
        net, opt = d2l_mlp(job["model"] == "legacy")
        try:
            if job["root"] == "model":
                net.load_weights(job["prefix"]).assert_consumed()
            elif job["root"] == "saved_model":
                net = tf.keras.models.load_model(job["dir"])
            else:
                tf.train.Checkpoint(model=net, optimizer=opt).restore(job["prefix"]).assert_consumed()
            r["restored"] = "ok"
        except Exception as e:
            r["restored"] = error(e)
        r["weights"] = [w.numpy().tobytes().hex() for w in net.weights]
print(json.dumps(results))
"""

# edits made by paramctl on each fresh TensorFlow checkpoint: (name, source kind, args, restore as)
EDITS = [
    ("mlp-copy", "mlp", ["convert", "{src}", "{out}"], "model"),
    ("mlp-reinit", "mlp", ["reinit", "{src}", "--init", "xavier", "--seed", "3", "-o", "{out}"], "model"),
    (
        "mlp-set",
        "mlp",
        ["set", "{src}", "layer_with_weights-0/kernel/.ATTRIBUTES/VARIABLE_VALUE[0, 0]", "42", "-o", "{out}"],
        "model",
    ),
    ("mlp-rename", "mlp", ["rename", "{src}", "s/layer_with_weights-1/second/", "-o", "{out}"], "model"),
    ("mlp-cast", "mlp", ["cast", "{src}", "--dtype", "bfloat16", "-o", "{out}"], None),
    ("legacy-rm", "legacy", ["rm", "{src}", "OPTIMIZER_SLOT", "-o", "{out}"], "model"),
    ("legacy-reinit", "legacy", ["reinit", "{src}", "--init", "normal(std=0.01)", "-o", "{out}"], "model"),
    ("manager-reinit", "manager", ["reinit", "{src}", "kernel", "--init", "constant(42)", "-o", "{out}"], "checkpoint"),
    (
        "manager-dir",
        "manager",
        ["set", "{src}", "model/layer_with_weights-1/bias/.ATTRIBUTES/VARIABLE_VALUE", "7", "-o", "{dir}/"],
        "checkpoint",
    ),
    ("manager-merge", "manager", ["merge", "{src}/ckpt-2", "{src}", "-o", "{out}"], "checkpoint"),
    ("train-rename", "train", ["rename", "{src}", "s/layer_with_weights-0/hidden/", "-o", "{out}"], "checkpoint"),
    ("dtypes-copy", "dtypes", ["convert", "{src}", "{out}.index"], None),
    ("shards-copy", "shards", ["convert", "{src}", "{out}"], None),
    ("partitioned-copy", "partitioned", ["convert", "{src}", "{out}"], None),
    ("from-safetensors", "safetensors", ["convert", "{src}", "{out}", "--to", "tf"], None),
    (
        "saved-model-reinit",
        "saved_model",
        ["reinit", "{src}", "kernel", "--init", "constant(42)", "-o", "{dir}/"],
        "saved_model",
    ),
]


@pytest.fixture(scope="module")
def tf_checks(tmp_path_factory):
    """Fresh checkpoints made by TensorFlow, paramctl's edits of them, and what TensorFlow reads
    back from everything (two TensorFlow processes in all)."""
    base = tmp_path_factory.mktemp("tf")
    made = base / "made"
    run_in("tensorflow", (TF_FIXTURES / "make_fixtures.py").read_text(), str(made), "--saved-model")
    from safetensors.numpy import save_file

    save_file(
        {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "h": np.array([1, 2], np.float16)},
        str(base / "m.safetensors"),
    )
    sources = {kind: made / kind / expected(made / kind)["prefix"] for kind in FRESH_KINDS}
    sources["safetensors"] = base / "m.safetensors"
    jobs, stderr = {}, {}
    for kind in FRESH_KINDS:
        model = {"mlp": "mlp", "legacy": "legacy", "manager": "mlp", "train": "mlp"}.get(kind)
        jobs[f"{kind}-source"] = {
            "prefix": str(sources[kind]),
            "model": model,
            "root": "checkpoint" if kind in ("manager", "train") else "model",
        }
    for name, kind, args, root in EDITS:
        out, directory = base / "out" / name / "ckpt", base / "out" / name / "dir"
        source = made / kind if kind in ("manager", "saved_model") else sources[kind]
        argv = [a.format(src=source, out=out, dir=directory) for a in args]
        result = run(*argv)
        assert result.exit_code == 0, (name, result.stderr)
        stderr[name] = result.stderr
        prefix = str(paramctl.load(str(directory if "{dir}/" in args else out)).extra.prefix)
        model = {"mlp": "mlp", "legacy": "legacy", "manager": "mlp", "train": "mlp", "saved_model": "mlp"}.get(kind)
        jobs[name] = {"prefix": prefix, "model": model if root else None, "root": root, "dir": str(directory)}
    results = run_in("tensorflow", CHECK, json.dumps(jobs))
    return {"made": made, "sources": sources, "jobs": jobs, "results": results, "stderr": stderr}


@pytest.mark.parametrize("kind", FRESH_KINDS)
def test_fresh_tensorflow_checkpoints_read_as_tensorflow_reads_them(tf_checks, kind):
    result = tf_checks["results"][f"{kind}-source"]
    assert_same_as_tf(str(tf_checks["sources"][kind]), result["tensors"])
    if "restored" in result:
        assert result["restored"] == "ok"


@pytest.mark.parametrize("name", [e[0] for e in EDITS])
def test_edited_outputs_load_back_in_tensorflow(tf_checks, name):
    job, result = tf_checks["jobs"][name], tf_checks["results"][name]
    assert isinstance(result["tensors"], dict), result["tensors"]
    assert_same_as_tf(job["prefix"], result["tensors"])  # load_checkpoint's values are paramctl's
    if job["root"]:
        assert result["restored"] == "ok"
        ckpt = paramctl.load(job["prefix"])
        training = ("optimizer/", "save_counter/", "keras_api/")
        model_keys = [k for k in ckpt.names() if not k.startswith(training) and ".OPTIMIZER_SLOT" not in k]
        # Keras restored the model's variables (kernel, bias of each Dense) from paramctl's values
        restored = sorted(result["weights"])
        assert sorted(bytes(ckpt[k].tobytes()).hex() for k in model_keys) == restored


def test_edits_did_what_they_say(tf_checks):
    results = tf_checks["results"]
    kernel = "layer_with_weights-0/kernel/.ATTRIBUTES/VARIABLE_VALUE"
    value = np.frombuffer(bytes.fromhex(results["mlp-set"]["tensors"][kernel]["hex"]), np.float32)
    assert value[0] == 42
    renamed = results["mlp-rename"]["tensors"]
    assert "second/kernel/.ATTRIBUTES/VARIABLE_VALUE" in renamed
    assert not any("layer_with_weights-1" in k for k in renamed)
    assert {v["dtype"] for k, v in results["mlp-cast"]["tensors"].items() if "kernel" in k} == {"bfloat16"}
    assert not any("OPTIMIZER_SLOT" in k for k in results["legacy-rm"]["tensors"])
    manager = results["manager-reinit"]["tensors"]
    k = np.frombuffer(bytes.fromhex(manager["model/" + kernel]["hex"]), np.float32)
    assert (k == 42).all()
    saved = results["saved-model-reinit"]["tensors"]
    assert (np.frombuffer(bytes.fromhex(saved[kernel]["hex"]), np.float32) == 42).all()
    made = tf_checks["made"] / "manager"
    assert (
        (Path(tf_checks["jobs"]["manager-dir"]["prefix"]).parent / "checkpoint")
        .read_text()
        .startswith('model_checkpoint_path: "ckpt-3"')
    )
    assert made.exists()
    assert "no object graph" in tf_checks["stderr"]["from-safetensors"]
    assert results["from-safetensors"]["tensors"]["w"]["shape"] == [2, 3]


def test_keys_that_expand_past_the_file_are_refused():
    """Each key shares all of the previous one and adds a byte: 4 bytes of table per key, keys
    growing without bound (quadratic work and memory) unless their total is capped."""
    v = _sstable.varint
    body = b"".join(v(n) + v(1) + v(0) + b"a" for n in range(60_000))
    body += (0).to_bytes(4, "little") + (1).to_bytes(4, "little")
    data = body + b"\x00" + _sstable.mask(_sstable.crc32c(body + b"\x00")).to_bytes(4, "little")
    handle = v(0) + v(len(body))
    index = v(0) + v(1) + v(len(handle)) + b"z" + handle + (0).to_bytes(4, "little") + (1).to_bytes(4, "little")
    index_at = len(data)
    data += index + b"\x00" + _sstable.mask(_sstable.crc32c(index + b"\x00")).to_bytes(4, "little")
    footer = v(0) + v(0) + v(index_at) + v(len(index))
    data += footer + b"\x00" * (40 - len(footer)) + _sstable.MAGIC.to_bytes(8, "little")
    with pytest.raises(paramctl.FormatError, match="more than 16 times the table's size"):
        list(_sstable.read_table(data))
