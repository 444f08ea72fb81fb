"""Keras layouts: converting between tf-keras 2 `.h5`, Keras 3 `.weights.h5` and `.keras` writes a
file the target's own loader loads into the same architecture, or refuses before writing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import FIXTURES, SAMPLES, run
from reference import run_in


def cnn():
    """The architecture of the tf-keras 2 fixtures, in Keras 3: Conv2D c1, BatchNormalization
    norm, Dense fc (Flatten between)."""
    import keras

    return keras.Sequential(
        [
            keras.Input((8, 8, 2)),
            keras.layers.Conv2D(4, 3, name="c1"),
            keras.layers.BatchNormalization(name="norm"),
            keras.layers.Flatten(),
            keras.layers.Dense(3, name="fc"),
        ]
    )


def weights(model) -> list[np.ndarray]:
    return [np.asarray(w) for w in model.get_weights()]


@pytest.fixture(scope="module")
def keras3_files(tmp_path_factory):
    """A Keras 3 model with non-trivial weights (BatchNormalization's moving statistics too),
    saved as .keras and .weights.h5; and its weights."""
    import keras

    keras.utils.set_random_seed(3)
    model = cnn()
    rng = np.random.default_rng(0)
    model.set_weights(
        [rng.normal(size=w.shape).astype(np.float32) + (i == 5) * 2 for i, w in enumerate(weights(model))]
    )
    root = tmp_path_factory.mktemp("keras3")
    model.save(root / "cnn.keras")
    model.save_weights(root / "cnn.weights.h5")
    return root / "cnn.keras", root / "cnn.weights.h5", weights(model)


def test_tfkeras2_full_model_to_weights_h5_loads_in_keras3(tmp_path):
    out = tmp_path / "cnn.weights.h5"
    result = run("convert", str(FIXTURES / "tfkeras2_cnn_full.h5"), str(out))
    assert result.exit_code == 0, result.stderr
    assert "left out 7 optimizer tensor(s)" in result.stderr
    expected = cnn()
    expected.load_weights(FIXTURES / "tfkeras2_cnn_full.h5")  # Keras 3's own legacy loader
    model = cnn()
    model.load_weights(out)
    for got, want in zip(weights(model), weights(expected), strict=True):
        np.testing.assert_array_equal(got, want)
    assert np.abs(weights(model)[0]).sum() > 0


@pytest.mark.parametrize("fixture", ["tfkeras2_cnn_weights.h5", "tfkeras2_gru_weights.h5"])
def test_tfkeras2_weights_file_to_weights_h5_is_refused(fixture, tmp_path):
    out = tmp_path / "x.weights.h5"
    result = run("convert", str(FIXTURES / fixture), str(out))
    assert result.exit_code == 2
    assert result.stderr.startswith(
        f"paramctl: error: {FIXTURES / fixture}: cannot write this hdf5 file's Keras layout as Keras 3 .weights.h5"
    )
    assert "does not say which class each layer is" in result.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_keras_archive_to_legacy_h5_loads_in_keras3_and_tfkeras2(keras3_files, tmp_path):
    archive, _, want = keras3_files
    out = tmp_path / "cnn.h5"
    result = run("convert", str(archive), str(out))
    assert result.exit_code == 0, result.stderr
    model = cnn()
    model.load_weights(out)  # Keras 3 reads a .h5 with its legacy, positional loader
    for got, expected in zip(weights(model), want, strict=True):
        np.testing.assert_array_equal(got, expected)
    loaded = run_in(
        "tensorflow",
        """
        import json, sys
        import tensorflow as tf
        model = tf.keras.Sequential([
            tf.keras.Input((8, 8, 2)),
            tf.keras.layers.Conv2D(4, 3, name="c1"),
            tf.keras.layers.BatchNormalization(name="norm"),
            tf.keras.layers.Flatten(),
            tf.keras.layers.Dense(3, name="fc"),
        ])
        model.load_weights(sys.argv[1])
        print(json.dumps([w.tolist() for w in model.get_weights()]))
        """,
        str(out),
    )
    assert isinstance(loaded, list)
    for got, expected in zip(loaded, want, strict=True):
        np.testing.assert_array_equal(np.array(got, np.float32), expected)


def test_weights_h5_to_legacy_h5_needs_a_certain_layer_order(keras3_files, tmp_path):
    _, weights_h5, _ = keras3_files
    out = tmp_path / "cnn.h5"
    result = run("convert", str(weights_h5), str(out))
    assert result.exit_code == 2
    assert "order of layers of different classes is not certain" in result.stderr
    assert not out.exists()
    # every layer a Dense: `dense`, `dense_1` count up in model order
    import keras

    mlp = keras.Sequential([keras.Input((20,)), keras.layers.Dense(256), keras.layers.Dense(10)])
    expected = keras.Sequential([keras.Input((20,)), keras.layers.Dense(256), keras.layers.Dense(10)])
    expected.load_weights(SAMPLES / "mlp.weights.h5")
    assert run("convert", str(SAMPLES / "mlp.weights.h5"), str(out)).exit_code == 0
    mlp.load_weights(out)
    for got, want in zip(weights(mlp), weights(expected), strict=True):
        np.testing.assert_array_equal(got, want)


def test_keras_archive_to_weights_h5_and_back_keeps_the_keras3_layout(keras3_files, tmp_path):
    archive, _, want = keras3_files
    out = tmp_path / "cnn.weights.h5"
    assert run("convert", str(archive), str(out)).exit_code == 0
    model = cnn()
    model.load_weights(out)
    for got, expected in zip(weights(model), want, strict=True):
        np.testing.assert_array_equal(got, expected)


def test_legacy_to_keras_archive_is_refused(tmp_path):
    out = tmp_path / "x.keras"
    result = run("convert", str(FIXTURES / "tfkeras2_cnn_full.h5"), str(out))
    assert result.exit_code == 2 and not out.exists()
    assert "needs the model's config.json" in result.stderr


def test_legacy_h5_to_h5_keeps_its_layout(tmp_path):
    out = tmp_path / "copy.h5"
    assert run("convert", str(FIXTURES / "tfkeras2_cnn_weights.h5"), str(out)).exit_code == 0
    model, expected = cnn(), cnn()
    model.load_weights(out)
    expected.load_weights(FIXTURES / "tfkeras2_cnn_weights.h5")
    for got, want in zip(weights(model), weights(expected), strict=True):
        np.testing.assert_array_equal(got, want)
    info = json.loads(run("info", str(out), "-f", "json").stdout)
    assert info["entries"]["layer_names"] == ["c1", "norm", "flatten", "fc"]


def test_nested_model_to_legacy_h5_is_refused_and_optimizer_state_is_left_out(tmp_path):
    import keras

    inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    nested = keras.Sequential([keras.Input((4,)), inner, keras.layers.Dense(2)])
    nested.save(tmp_path / "nested.keras")
    out = tmp_path / "nested.h5"
    result = run("convert", str(tmp_path / "nested.keras"), str(out))
    assert result.exit_code == 2 and not out.exists()
    assert "is not a variable of a top-level layer" in result.stderr
    # a trained model's archive holds Adam's variables: the legacy file holds the model's only
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    model.fit(np.ones((8, 4), np.float32), np.ones((8, 1), np.float32), epochs=1, verbose=0)
    model.save(tmp_path / "trained.keras")
    out = tmp_path / "trained.h5"
    result = run("convert", str(tmp_path / "trained.keras"), str(out))
    assert result.exit_code == 0, result.stderr
    assert "optimizer tensor(s): the legacy layout is the model's only" in result.stderr
    fresh = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(1)])
    fresh.load_weights(out)
    for got, want in zip(weights(fresh), weights(model), strict=True):
        np.testing.assert_array_equal(got, want)
