"""Generate the sample checkpoints in this directory with the real libraries.

The models are the ones from the "Parameter Management" chapter of Dive into
Deep Learning (PyTorch version), with concrete layer sizes instead of lazy ones.

Files written next to this script:

- ``mlp.pt``: ``torch.save(net.state_dict())`` of
  ``nn.Sequential(nn.Linear(20, 256), nn.ReLU(), nn.Linear(256, 10))``.
  Tensor names: ``0.weight``, ``0.bias``, ``2.weight``, ``2.bias`` (float32).
- ``mlp.safetensors``: the same state_dict written with
  ``safetensors.torch.save_file`` (header metadata ``{"format": "pt"}``).
- ``mlp.keras``: Keras 3 native zip archive (``model.save``) of
  ``keras.Sequential([keras.Input((20,)), Dense(256, activation="relu"), Dense(10)])``.
- ``mlp.weights.h5``: the same Keras model's ``model.save_weights`` (Keras 3 HDF5 weights layout).
- ``mlp.h5``: the same Keras model's ``model.save("mlp.h5")``, i.e. the legacy (Keras 2 style)
  HDF5 full-model format with a ``model_config`` attribute and a ``model_weights`` group.
- ``nested.pt``: the chapter's nested blocks, ``rgnet = nn.Sequential(block2(), nn.Linear(4, 1))``
  where ``block2`` holds four ``block1`` modules named ``"block 0"`` .. ``"block 3"``.  The
  spaces end up in the tensor names (``0.block 0.0.weight``) exactly as in the chapter.
- ``shared.pt``: the chapter's tied layer: the same ``nn.Linear(8, 8)`` instance used at
  positions 2 and 4, so ``2.weight``/``4.weight`` and ``2.bias``/``4.bias`` share one storage
  each inside the file (torch.load gives tensors with equal ``data_ptr()``).

Re-run from the repository root with::

    .venv/bin/python sample_checkpoints/make_samples.py

Seeds are fixed (``torch.manual_seed(0)`` before each PyTorch model,
``keras.utils.set_random_seed(0)`` before the Keras model), so the parameter values are
the same on every run.  ``mlp.pt``, ``nested.pt``, ``shared.pt``, ``mlp.safetensors``,
``mlp.weights.h5`` and ``mlp.h5`` come out byte-for-byte identical on every run with the
same library versions.  ``mlp.keras`` does not: Keras writes the save time into
``metadata.json`` (``date_saved``), the ``model.weights.h5`` zip member gets the current time
as its zip timestamp, and ``config.json`` contains ``shared_object_id`` values that are Python
``id()``s (memory addresses).  Its parameter values, layer names and the bytes of the
embedded ``model.weights.h5`` are reproducible; the archive bytes are not.
Keras is forced onto the torch backend (``KERAS_BACKEND=torch``) before it is imported.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ["KERAS_BACKEND"] = "torch"  # must be set before keras is imported

import keras
import torch
from safetensors.torch import save_file
from torch import nn

OUT_DIR = Path(__file__).parent


def make_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 256), nn.ReLU(), nn.Linear(256, 10))


def block1() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4), nn.ReLU())


def block2() -> nn.Sequential:
    net = nn.Sequential()
    for i in range(4):
        # Nested here, as in the chapter (module names contain a space).
        net.add_module(f"block {i}", block1())
    return net


def make_nested() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(block2(), nn.Linear(4, 1))


def make_shared() -> nn.Sequential:
    torch.manual_seed(0)
    # We need to give the shared layer a name so that we can refer to its parameters.
    shared = nn.Linear(8, 8)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), shared, nn.ReLU(), shared, nn.ReLU(), nn.Linear(8, 1))


def make_keras_mlp() -> keras.Sequential:
    # Reset Keras' global state first so the auto-generated layer names are always "dense"/"dense_1".
    keras.utils.clear_session()
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((20,)), keras.layers.Dense(256, activation="relu"), keras.layers.Dense(10)])


def main() -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)

    mlp = make_mlp()
    torch.save(mlp.state_dict(), OUT_DIR / "mlp.pt")
    save_file(mlp.state_dict(), OUT_DIR / "mlp.safetensors", metadata={"format": "pt"})

    torch.save(make_nested().state_dict(), OUT_DIR / "nested.pt")
    torch.save(make_shared().state_dict(), OUT_DIR / "shared.pt")

    model = make_keras_mlp()
    model.save(OUT_DIR / "mlp.keras")
    model.save_weights(OUT_DIR / "mlp.weights.h5")
    model.save(OUT_DIR / "mlp.h5")  # .h5 suffix: Keras 3 writes the legacy HDF5 format (with a warning)

    for name in ("mlp.pt", "mlp.safetensors", "mlp.keras", "mlp.weights.h5", "mlp.h5", "nested.pt", "shared.pt"):
        print(f"{name:16} {(OUT_DIR / name).stat().st_size:>7} bytes")


if __name__ == "__main__":
    main()
