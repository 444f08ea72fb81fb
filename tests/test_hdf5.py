"""HDF5 and `.keras`: the reader against h5py, the writer through the real Keras loaders.

Keras 3 files are made here (torch backend); the tf-keras 2 files are the shared fixtures.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import ml_dtypes
import numpy as np
import pytest
from conftest import FIXTURES

import paramctl
from paramctl.table import Checkpoint, Tensor, tensor_from_array

WEIGHTS = "model.weights.h5"
KINDS = {"weights": ".weights.h5", "legacy": ".h5", "keras": ".keras"}


@pytest.fixture(scope="module")
def keras():
    os.environ["KERAS_BACKEND"] = "torch"
    import keras

    return keras


@dataclass
class Saved:
    model: Any  # the keras.Model that was saved
    build: Callable[[], Any]  # a fresh model of the same architecture
    files: dict[str, Path]  # kind (KINDS) -> the file


@pytest.fixture(scope="module")
def saved(keras, tmp_path_factory) -> dict[str, Saved]:
    """Keras 3 models saved in every format: an MLP, a CNN trained one step (so BatchNorm
    statistics and optimizer variables are real), and a bf16 model."""
    layers = keras.layers
    builders = {
        "mlp": lambda: keras.Sequential([keras.Input((20,)), layers.Dense(256, activation="relu"), layers.Dense(10)]),
        "cnn": lambda: keras.Sequential(
            [
                keras.Input((8, 8, 3)),
                layers.Conv2D(4, 3),
                layers.BatchNormalization(),
                layers.Flatten(),
                layers.Dense(5),
            ]
        ),
        "bf16": lambda: keras.Sequential(
            [keras.Input((8,)), layers.Dense(16, dtype="bfloat16"), layers.Dense(4, dtype="bfloat16")]
        ),
    }
    keras.utils.set_random_seed(7)
    directory = tmp_path_factory.mktemp("keras")
    out = {}
    for name, build in builders.items():
        model = build()
        if name == "cnn":
            model.compile(optimizer="adam", loss="mse")
            model.fit(np.random.rand(4, 8, 8, 3), np.random.rand(4, 5), epochs=1, verbose=0)
        files = {kind: directory / f"{name}{suffix}" for kind, suffix in KINDS.items()}
        model.save(files["keras"])  # first: a legacy save drops the optimizer from the model's compile config
        model.save_weights(files["weights"])
        model.save(files["legacy"])
        out[name] = Saved(model, build, files)
    return out


def fixture_builders(keras) -> dict[str, Callable[[], Any]]:
    """Keras 3 models with the architectures of the tf-keras 2 fixtures (see their README)."""
    layers = keras.layers

    def cnn():
        return keras.Sequential(
            [
                keras.Input((8, 8, 2)),
                layers.Conv2D(4, 3, name="c1"),
                layers.BatchNormalization(name="norm"),
                layers.Flatten(name="flatten"),
                layers.Dense(3, name="fc"),
            ]
        )

    def gru():
        return keras.Sequential(
            [
                keras.Input((5,), dtype="int32"),
                layers.Embedding(30, 4, name="tok"),
                layers.GRU(3, name="gru"),
                layers.Dense(1, name="y"),
            ]
        )

    return {"tfkeras2_cnn_weights.h5": cnn, "tfkeras2_cnn_full.h5": cnn, "tfkeras2_gru_weights.h5": gru}


ALL_FILES = [f"{model}:{kind}" for model in ("mlp", "cnn", "bf16") for kind in KINDS] + [
    "tfkeras2_cnn_weights.h5",
    "tfkeras2_cnn_full.h5",
    "tfkeras2_gru_weights.h5",
]


def file_of(saved: dict[str, Saved], key: str) -> Path:
    if ":" in key:
        model, kind = key.split(":")
        return saved[model].files[kind]
    return FIXTURES / key


# --- what h5py sees ------------------------------------------------------------------------------


@contextmanager
def h5(path: Path):
    """The HDF5 file at PATH, or the weights file inside a .keras archive."""
    if path.suffix == ".keras":
        with zipfile.ZipFile(path) as z:
            data = z.read(WEIGHTS)
        with h5py.File(io.BytesIO(data), "r") as f:
            yield f
    else:
        with h5py.File(path, "r") as f:
            yield f


def h5_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every numeric dataset as an array; Keras's tagged opaque bf16 as ml_dtypes bfloat16."""
    found = {}

    def visit(name, obj):
        if not isinstance(obj, h5py.Dataset):
            return
        if obj.dtype.kind in "biufc":
            found[name] = np.asarray(obj[()])
        elif obj.dtype.kind == "V" and obj.attrs.get("dtype") == "bfloat16":
            found[name] = np.asarray(obj[()]).view(ml_dtypes.bfloat16)

    with h5(path) as f:
        f.visititems(visit)
    return found


def attrs_of(obj) -> list[tuple]:
    """Each attribute's name, stored type, shape and value."""
    out = []
    for name in obj.attrs:
        aid = obj.attrs.get_id(name)
        value = obj.attrs[name]
        value = value.tolist() if isinstance(value, np.ndarray) else value
        out.append((name, aid.dtype.str, h5py.check_string_dtype(aid.dtype), aid.shape, value))
    return out


def structure(path: Path) -> list[tuple]:
    """Every group and dataset, in h5py's visiting order, with its attributes, dtype and shape."""
    with h5(path) as f:
        items = [("", "group", attrs_of(f))]

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                items.append((name, "dataset", attrs_of(obj), obj.dtype.str, obj.shape, obj.chunks, obj.compression))
            else:
                items.append((name, "group", attrs_of(obj)))

        f.visititems(visit)
    return items


def contents(path: Path) -> dict[str, bytes]:
    """The bytes of every dataset, numeric or not."""
    found = {}

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            found[name] = np.asarray(obj[()]).tobytes()

    with h5(path) as f:
        f.visititems(visit)
    return found


def values(variables) -> list[bytes]:
    return [np.asarray(v.numpy()).tobytes() for v in variables]


# --- reading -------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ALL_FILES)
def test_load_matches_h5py(saved, key):
    path = file_of(saved, key)
    ckpt = paramctl.load(str(path))
    assert ckpt.format == ("keras" if path.suffix == ".keras" else "hdf5")
    want = h5_tensors(path)
    assert sorted(ckpt.names()) == sorted(want)
    assert len(ckpt) > 0 or key == "bf16:legacy"
    for t in ckpt:
        assert t.shape == want[t.name].shape, t.name
        assert t.dtype == str(want[t.name].dtype), t.name
        assert t.array().tobytes() == want[t.name].tobytes(), t.name
        assert t.storage.load is None, "Keras datasets are contiguous: read at their offset, without h5py"


def test_keras_archive_offsets_point_into_the_archive(saved):
    path = saved["mlp"].files["keras"]
    ckpt = paramctl.load(str(path))
    raw = path.read_bytes()
    for t in ckpt:
        assert t.storage.path == str(path)
        assert raw[t.storage.offset : t.storage.offset + t.nbytes] == t.tobytes()


def test_scalars_and_optimizer_variables_are_rows(saved):
    ckpt = paramctl.load(str(saved["cnn"].files["weights"]))
    optimizer = [t for t in ckpt if t.name.startswith("optimizer/vars/")]
    # Adam over 6 trainable variables: iteration, learning rate, then a momentum and a velocity for each;
    # in natural order, so vars/10 follows vars/9
    assert [t.name for t in optimizer] == [f"optimizer/vars/{i}" for i in range(14)]
    assert (optimizer[0].shape, optimizer[0].dtype, optimizer[0].array().item()) == ((), "int32", 1)


def test_legacy_rows_follow_layer_names_and_weight_names():
    path = FIXTURES / "tfkeras2_cnn_full.h5"
    with h5py.File(path) as f:
        weights = f["model_weights"]
        want = [
            f"model_weights/{layer}/{w}"
            for layer in weights.attrs["layer_names"]
            for w in weights[layer].attrs["weight_names"]
        ]
        want += [f"optimizer_weights/{w}" for w in f["optimizer_weights"].attrs["weight_names"]]
    assert paramctl.load(str(path)).names() == want
    assert want[:2] == ["model_weights/c1/c1/kernel:0", "model_weights/c1/c1/bias:0"]


def test_legacy_split_layer_names_attribute(tmp_path):
    """Keras splits attribute lists over 64 KB into layer_names0, layer_names1, ..."""
    path = tmp_path / "split.h5"
    with h5py.File(path, "w") as f:
        f.attrs["layer_names0"] = np.array([b"b"])
        f.attrs["layer_names1"] = np.array([b"a"])
        for layer in "ab":
            f[f"{layer}/{layer}/w:0"] = np.ones(2, "f4")
            f[layer].attrs["weight_names"] = np.array([f"{layer}/w:0".encode()])
    assert paramctl.load(str(path)).names() == ["b/b/w:0", "a/a/w:0"]
    out = tmp_path / "out.h5"
    paramctl.save(paramctl.load(str(path)), str(out))
    assert structure(out) == structure(path)


def test_untagged_opaque_data_is_not_a_tensor_and_is_kept(saved, tmp_path):
    """Keras 3's legacy `.h5` writes bf16 as opaque bytes without the `dtype` tag (and cannot load it
    back); nothing says what the bytes are, so they are carried along, not listed."""
    path = saved["bf16"].files["legacy"]
    assert paramctl.load(str(path)).names() == []
    out = tmp_path / "bf16.h5"
    paramctl.save(paramctl.load(str(path)), str(out))
    assert contents(out) == contents(path) and structure(out) == structure(path)


def test_handmade_hdf5_features(tmp_path):
    """Compression, big-endian data, strings, a committed type, soft links, and hard links: a
    second name for a dataset (a tie) and a cycle. (External links: tests/test_hostile.py.)"""
    path = tmp_path / "features.h5"
    with h5py.File(path, "w") as f:
        f.attrs["note"] = "kept"
        f.create_dataset("packed", data=np.arange(100, dtype="f4").reshape(10, 10), compression="gzip", chunks=(5, 5))
        f["big"] = np.arange(6, dtype=">i4")
        f["text"] = "not a tensor"
        f["flags"] = np.array([True, False])
        f["group/vars/10"] = np.ones(2, "f2")
        f["group/vars/9"] = np.zeros(2, "f2")
        f["group"].attrs.create("ints", np.arange(3, dtype="i8"))
        f["group/loop"] = f["group"]
        f["alias"] = f["packed"]
        f["type"] = np.dtype("<f8")
        f["soft"] = h5py.SoftLink("/packed")
    ckpt = paramctl.load(str(path))
    assert [(t.name, t.dtype) for t in ckpt] == [
        ("alias", "float32"),
        ("big", "int32"),
        ("flags", "bool"),
        ("group/vars/9", "float16"),
        ("group/vars/10", "float16"),
        ("packed", "float32"),
    ]
    assert ckpt["big"].array().tolist() == list(range(6))
    assert ckpt["packed"].array().tolist() == np.arange(100).reshape(10, 10).tolist()
    assert ckpt["packed"].storage.reader is not None  # decoded by h5py a range at a time
    assert ckpt.tie_groups() == [["alias", "packed"]]
    out = tmp_path / "out.h5"
    paramctl.save(ckpt, str(out))
    # all kept, compression included, but `big` is little-endian now, as the table holds it, and
    # the tie is written as two datasets plus paramctl's record of it at the root
    changed = ("", "big", "packed")
    assert [i for i in structure(out) if i[0] not in changed] == [i for i in structure(path) if i[0] not in changed]
    with h5py.File(out) as f:
        assert f["packed"] != f["alias"] and f["packed"].compression == "gzip"
        assert dict(f.attrs) == {"note": "kept", "paramctl_ties": '{"packed": "alias"}'}
        assert f["packed"][()].tobytes() == f["alias"][()].tobytes()
        assert f["big"].dtype == np.dtype("<i4") and f["big"][()].tolist() == list(range(6))
        assert f["group/loop"] == f["group"]
        assert f.get("soft", getlink=True).path == "/packed"
        assert f["text"][()] == b"not a tensor"


def test_dataset_layouts(tmp_path):
    """Compact, never-written and contiguous datasets (behind a user block) are rows; an empty one
    is not, and is written back as it was. (External and virtual ones: tests/test_hostile.py.)"""
    path = tmp_path / "layouts.h5"
    with h5py.File(path, "w", userblock_size=512) as f:
        f["plain"] = np.arange(6, dtype="f8").reshape(2, 3)
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_layout(h5py.h5d.COMPACT)
        f.create_dataset("compact", data=np.arange(3, dtype="i2"), dcpl=dcpl)
        f.create_dataset("unwritten", (2, 2), "f4")  # no storage yet (HDF5 gives an offset all the same)
        f["empty"] = h5py.Empty("f4")
    ckpt = paramctl.load(str(path))
    assert [(t.name, t.dtype, t.storage.reader is None) for t in ckpt] == [
        ("compact", "int16", False),
        ("plain", "float64", True),
        ("unwritten", "float32", False),
    ]
    assert ckpt["plain"].array().tolist() == [[0, 1, 2], [3, 4, 5]]
    assert ckpt["compact"].array().tolist() == [0, 1, 2]
    assert ckpt["unwritten"].array().tolist() == [[0, 0], [0, 0]]
    out = tmp_path / "out.h5"
    paramctl.save(ckpt, str(out))
    assert structure(out) == structure(path)
    with h5py.File(out) as f:
        assert f["empty"].shape is None


def test_tagged_opaque_datasets(tmp_path):
    """Opaque data is a row only under a `dtype` tag (text or bytes) naming a type of its size."""
    path = tmp_path / "tagged.h5"
    with h5py.File(path, "w") as f:
        for name, values, tag in [
            ("text_tag", np.ones(3, ml_dtypes.bfloat16), "bfloat16"),
            ("bytes_tag", np.ones(3, ml_dtypes.bfloat16), np.bytes_(b"bfloat16")),
            ("fp8", np.ones(2, ml_dtypes.float8_e4m3fn), "float8_e4m3fn"),
            ("wrong_size", np.ones(2, ml_dtypes.bfloat16), "float8_e4m3fn"),
            ("four_bytes", np.zeros(2, "V4"), "bfloat16"),
            ("unknown_tag", np.ones(2, ml_dtypes.bfloat16), "bf16"),
            ("untagged", np.ones(2, ml_dtypes.bfloat16), None),
        ]:
            f[name] = values
            if tag is not None:
                f[name].attrs["dtype"] = tag
    ckpt = paramctl.load(str(path))
    assert [(t.name, t.dtype) for t in ckpt] == [
        ("bytes_tag", "bfloat16"),
        ("fp8", "float8_e4m3fn"),
        ("text_tag", "bfloat16"),
    ]
    assert ckpt["fp8"].array().tobytes() == np.ones(2, ml_dtypes.float8_e4m3fn).tobytes()


def test_creation_order_and_a_link_back_to_the_root(tmp_path):
    """A group that tracks creation order lists its links so, natural order or not; a hard link
    back to the root ends, its rows ties of the rows first reached."""
    path = tmp_path / "ordered.h5"
    with h5py.File(path, "w", track_order=True) as f:
        f["w10"] = np.ones(2, "f4")
        f["w9"] = np.zeros(2, "f4")
        f["up"] = f["/"]
    ckpt = paramctl.load(str(path))
    assert ckpt.names()[:2] == ["w10", "w9"]
    assert all(t.storage is ckpt[t.name.rpartition("/")[2]].storage for t in ckpt)


def test_names_that_are_not_utf8_are_a_format_error(tmp_path):
    path = tmp_path / "latin1.h5"
    with h5py.File(path, "w") as f:
        f[b"caf\xe9"] = np.ones(2, "f4")
    with pytest.raises(paramctl.FormatError):
        paramctl.load(str(path))


# --- writing -------------------------------------------------------------------------------------


def replace(ckpt: Checkpoint, name: str, array: np.ndarray) -> None:
    """Give row NAME new values held in memory, as an edit does."""
    i = ckpt.names().index(name)
    ckpt.tensors[i] = tensor_from_array(name, array)


def edit_first_weight(ckpt: Checkpoint, shape: tuple[int, ...]) -> tuple[str, np.ndarray]:
    """Change the values of the first row of SHAPE (the model's first weight: layers come first)."""
    row = next(t for t in ckpt if t.shape == shape)
    old = row.array()
    new = (old.astype(np.float32) * 2 + 1).astype(old.dtype)
    replace(ckpt, row.name, new)
    return row.name, new


@pytest.mark.parametrize("model", ["mlp", "cnn", "bf16"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_unmodified_round_trip_is_identical(saved, tmp_path, model, kind):
    path = saved[model].files[kind]
    out = tmp_path / path.name
    paramctl.save(paramctl.load(str(path)), str(out))
    assert contents(out) == contents(path)
    assert structure(out) == structure(path)


@pytest.mark.parametrize("model", ["mlp", "cnn", "bf16"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_edited_file_loads_in_keras(keras, saved, tmp_path, model, kind):
    if model == "bf16" and kind == "legacy":
        pytest.skip("Keras 3 cannot load its own legacy bf16 .h5 (see test_untagged_opaque_data...)")
    s = saved[model]
    path = s.files[kind]
    ckpt = paramctl.load(str(path))
    name, new = edit_first_weight(ckpt, tuple(s.model.weights[0].shape))
    out = tmp_path / path.name
    paramctl.save(ckpt, str(out))

    if kind == "keras":
        loaded = keras.models.load_model(out)
    else:
        loaded = s.build()
        loaded.load_weights(out)
    want = values(s.model.weights)
    want[0] = new.tobytes()
    assert values(loaded.weights) == want
    if kind == "keras" and getattr(s.model, "optimizer", None) is not None:
        assert values(loaded.optimizer.variables) == values(s.model.optimizer.variables)

    before, after = contents(path), contents(out)
    assert after.pop(name) == new.tobytes() and before.pop(name) != new.tobytes()
    assert after == before
    assert structure(out) == structure(path)
    if kind == "keras":
        with zipfile.ZipFile(path) as a, zipfile.ZipFile(out) as b:
            assert [i.filename for i in b.infolist()] == [i.filename for i in a.infolist()]
            assert all(i.compress_type == zipfile.ZIP_STORED for i in b.infolist())
            assert all(a.read(n) == b.read(n) for n in a.namelist() if n != WEIGHTS)


@pytest.mark.parametrize("fixture", ["tfkeras2_cnn_weights.h5", "tfkeras2_cnn_full.h5", "tfkeras2_gru_weights.h5"])
def test_edited_tfkeras2_fixture_loads_in_keras3(keras, tmp_path, fixture):
    build = fixture_builders(keras)[fixture]
    reference = build()
    reference.load_weights(FIXTURES / fixture)
    ckpt = paramctl.load(str(FIXTURES / fixture))
    name, new = edit_first_weight(ckpt, tuple(reference.weights[0].shape))
    out = tmp_path / fixture
    paramctl.save(ckpt, str(out))

    loaded = build()
    loaded.load_weights(out)
    want = values(reference.weights)
    want[0] = new.tobytes()
    assert values(loaded.weights) == want
    # keras_version above all: without it tf-keras assumes Keras 1 and transposes conv kernels
    assert structure(out) == structure(FIXTURES / fixture)
    before, after = contents(FIXTURES / fixture), contents(out)
    assert after.pop(name) != before.pop(name) and after == before


@pytest.mark.parametrize("fixture", ["tfkeras2_cnn_weights.h5", "tfkeras2_cnn_full.h5", "tfkeras2_gru_weights.h5"])
def test_unmodified_tfkeras2_fixture_round_trip_is_identical(tmp_path, fixture):
    out = tmp_path / fixture
    paramctl.save(paramctl.load(str(FIXTURES / fixture)), str(out))
    assert contents(out) == contents(FIXTURES / fixture)
    assert structure(out) == structure(FIXTURES / fixture)


def test_cast_writes_bf16_as_keras_does(saved, tmp_path):
    ckpt = paramctl.load(str(saved["mlp"].files["weights"]))
    replace(ckpt, "layers/dense/vars/0", ckpt["layers/dense/vars/0"].array().astype(ml_dtypes.bfloat16))
    bf16 = paramctl.load(str(saved["bf16"].files["weights"]))
    replace(bf16, "layers/dense/vars/0", bf16["layers/dense/vars/0"].array().astype(np.float32))
    for table, name, dtype in [(ckpt, "mlp", "bfloat16"), (bf16, "bf16", "float32")]:
        out = tmp_path / f"{name}.weights.h5"
        paramctl.save(table, str(out))
        with h5py.File(out) as f:
            ds = f["layers/dense/vars/0"]
            want = ("|V2", {"dtype": "bfloat16"}) if dtype == "bfloat16" else ("<f4", {})
            assert (ds.dtype.str, dict(ds.attrs)) == want
        assert paramctl.load(str(out))["layers/dense/vars/0"].dtype == dtype


def test_removed_rows_are_dropped_and_new_rows_created(saved, tmp_path):
    ckpt = paramctl.load(str(saved["mlp"].files["weights"]))
    ckpt.tensors = [t for t in ckpt if t.name != "layers/dense_1/vars/1"]
    ckpt.tensors.append(tensor_from_array("extra/new", np.arange(3, dtype="i8")))
    out = tmp_path / "out.weights.h5"
    paramctl.save(ckpt, str(out))
    assert paramctl.load(str(out)).names() == [
        "extra/new",
        "layers/dense/vars/0",
        "layers/dense/vars/1",
        "layers/dense_1/vars/0",
    ]
    assert h5_tensors(out)["extra/new"].tolist() == [0, 1, 2]


def test_keras_archive_written_as_weights_h5(keras, saved, tmp_path):
    s = saved["cnn"]
    ckpt = paramctl.load(str(s.files["keras"]))
    out = tmp_path / "cnn.weights.h5"
    paramctl.save(ckpt, str(out))
    assert h5py.is_hdf5(out)
    loaded = s.build()
    loaded.load_weights(out)
    assert values(loaded.weights) == values(s.model.weights)


def test_compressed_keras_archive(keras, saved, tmp_path):
    s = saved["mlp"]
    deflated = tmp_path / "deflated.keras"
    with zipfile.ZipFile(s.files["keras"]) as a, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as b:
        for info in a.infolist():
            b.writestr(info.filename, a.read(info))
    ckpt = paramctl.load(str(deflated))
    assert all(t.storage.buffer is not None for t in ckpt)  # the decompressed member, read in memory
    assert {t.name: t.array().tobytes() for t in ckpt} == {n: a.tobytes() for n, a in h5_tensors(deflated).items()}
    out = tmp_path / "out.keras"
    paramctl.save(ckpt, str(out))
    assert values(keras.models.load_model(out).weights) == values(s.model.weights)


def test_keras_archive_assets_are_copied(keras, saved, tmp_path):
    s = saved["mlp"]
    with_assets = tmp_path / "assets.keras"
    with_assets.write_bytes(s.files["keras"].read_bytes())
    with zipfile.ZipFile(with_assets, "a") as z:
        z.writestr("assets/vocab.txt", "a\nb\n")
    out = tmp_path / "out.keras"
    paramctl.save(paramctl.load(str(with_assets)), str(out))
    with zipfile.ZipFile(out) as z:
        assert z.namelist() == ["metadata.json", "config.json", WEIGHTS, "assets/vocab.txt"]
        assert z.read("assets/vocab.txt") == b"a\nb\n"
    assert values(keras.models.load_model(out).weights) == values(s.model.weights)


def test_other_formats_write_plain_hdf5_in_table_order(tmp_path):
    from safetensors.numpy import save_file

    source = tmp_path / "m.safetensors"
    save_file({"z.weight": np.ones((2, 3), "f4"), "a.bias": np.zeros(3, "f2"), "blocks/0/w": np.eye(2)}, source)
    ckpt = paramctl.load(str(source))
    out = tmp_path / "m.h5"
    paramctl.save(ckpt, str(out))
    back = paramctl.load(str(out))
    assert back.names() == ckpt.names()
    assert {t.name: (t.dtype, t.array().tobytes()) for t in back} == {
        t.name: (t.dtype, t.array().tobytes()) for t in ckpt
    }
    assert sorted(h5_tensors(out)) == sorted(ckpt.names())
    with pytest.raises(paramctl.UsageError, match="config.json"):
        paramctl.save(ckpt, str(tmp_path / "m.keras"))
    assert not (tmp_path / "m.keras").exists()


def test_tied_rows_are_written_as_copies(saved, tmp_path):
    ckpt = paramctl.load(str(saved["mlp"].files["weights"]))
    kernel = ckpt["layers/dense/vars/1"]
    ckpt.tensors.append(Tensor("tied/copy", kernel.shape, kernel.dtype, kernel.storage))
    ckpt.link_ties()
    assert ckpt.tie_groups() == [["layers/dense/vars/1", "tied/copy"]]
    out = tmp_path / "tied.weights.h5"
    paramctl.save(ckpt, str(out))
    found = h5_tensors(out)
    assert found["tied/copy"].tobytes() == found["layers/dense/vars/1"].tobytes() == kernel.tobytes()


def test_deep_nesting(tmp_path):
    path = tmp_path / "deep.h5"
    name = "/".join(["g"] * 1500) + "/w"
    with h5py.File(path, "w") as f:
        f[name] = np.ones(2, "f4")
    out = tmp_path / "out.h5"
    paramctl.save(paramctl.load(str(path)), str(out))
    assert paramctl.load(str(out)).names() == [name]


@pytest.mark.parametrize("names", [["a", "a/b"], ["a//b"], ["/a"], ["a/./b"]])
def test_names_that_are_not_hdf5_paths_are_refused(tmp_path, names):
    ckpt = Checkpoint("mem", "safetensors", [tensor_from_array(n, np.ones(1, "f4")) for n in names])
    with pytest.raises(paramctl.UsageError, match="cannot write"):
        paramctl.save(ckpt, str(tmp_path / "x.h5"))


# --- errors and imports ----------------------------------------------------------------------------


def garbage_keras(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("metadata.json", "{}")
        z.writestr("config.json", "{}")
        z.writestr(WEIGHTS, b"\x89HDF\r\n\x1a\n" + os.urandom(2000))


@pytest.mark.parametrize(
    "make",
    [
        lambda p, mlp: p.write_bytes(b""),
        lambda p, mlp: p.write_bytes(mlp.read_bytes()[: mlp.stat().st_size // 2]),
        lambda p, mlp: p.write_bytes(mlp.read_bytes()[:3000]),
        lambda p, mlp: p.write_bytes(b"\x89HDF\r\n\x1a\n" + os.urandom(4000)),
        lambda p, mlp: garbage_keras(p),
    ],
    ids=["empty", "truncated-half", "truncated-header", "random-after-magic", "keras-garbage-weights"],
)
def test_malformed_files_raise_format_error(saved, tmp_path, make):
    path = tmp_path / "bad"
    make(path, saved["mlp"].files["legacy"])
    with pytest.raises(paramctl.FormatError):
        paramctl.load(str(path))


def test_reading_imports_neither_torch_nor_keras(saved):
    paths = [str(saved["cnn"].files[kind]) for kind in KINDS]
    code = (
        "import sys, paramctl\n"
        f"for p in {paths!r}:\n"
        "    [t.array() for t in paramctl.load(p)]\n"
        "print(sorted({'torch', 'keras'} & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout == "[]\n"
