"""New shapes (deferred initialization on files): reinit --shape / --out / --in / --keep, drawn
with the fans of the new shape, ties resized together, and every output loaded into the model
built with the new sizes: strict load_state_dict, from_pretrained (a BERT classifier head grown
from 3 to 7 labels, a GPT-2 vocabulary grown by 5 tokens with its tied lm_head), Keras
load_weights."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import run
from torch import nn

from paramctl.init import tensor_seed


def reinit(*args: str) -> str:
    result = run("reinit", *args)
    assert result.exit_code == 0, result.stderr
    return result.stderr


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


@pytest.fixture
def mlp_file(tmp_path):
    path = tmp_path / "mlp.pt"
    torch.save(mlp().state_dict(), path)
    return path


def test_shape_draws_with_the_fans_of_the_new_shape(mlp_file, tmp_path):
    out = tmp_path / "out.pt"
    stderr = reinit(str(mlp_file), "^0\\.weight$", "--shape", "15,4", "--init", "xavier", "--seed", "3", "-o", str(out))
    assert "0.weight: [8, 4] -> [15, 4]" in stderr
    expected = torch.empty(15, 4)
    nn.init.xavier_uniform_(expected, generator=torch.Generator().manual_seed(tensor_seed(3, "0.weight")))
    assert torch.equal(torch.load(out)["0.weight"], expected)


def test_out_moves_weight_bias_and_norm_together_and_in_follows(mlp_file, tmp_path):
    """A hidden layer from 8 to 6 units: Linear(4, 8) and its BatchNorm1d by --out, the next
    Linear's input by --in; the file loads strictly into the model built with 6."""
    grown = tmp_path / "grown.pt"
    stderr = reinit(
        str(mlp_file), "^[01]\\.", "--out", "6", "--init", "kaiming_uniform", "--seed", "0", "-o", str(grown)
    )
    for line in ("0.weight: [8, 4] -> [6, 4]", "0.bias: [8] -> [6]", "1.running_var: [8] -> [6]"):
        assert line in stderr
    out = tmp_path / "six.pt"
    reinit(str(grown), "^3\\.weight$", "--in", "6", "--init", "kaiming_uniform", "--seed", "0", "-o", str(out))
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    state = torch.load(out)
    model.load_state_dict(state, strict=True)
    assert state["1.weight"].tolist() == [1.0] * 6 and state["1.running_mean"].tolist() == [0.0] * 6
    assert state["0.bias"].tolist() == [0.0] * 6 and state["1.num_batches_tracked"] == 0
    assert state["3.bias"].tolist() == mlp().state_dict()["3.bias"].tolist()  # not selected: unchanged
    model.eval()(torch.ones(2, 4))


def test_keep_keeps_the_overlapping_block(mlp_file, tmp_path):
    out = tmp_path / "out.pt"
    reinit(str(mlp_file), "^3\\.", "--out", "5", "--keep", "--init", "normal(std=0.02)", "-o", str(out))
    old, new = mlp().state_dict(), torch.load(out)
    assert torch.equal(new["3.weight"][:3], old["3.weight"]) and torch.equal(new["3.bias"][:3], old["3.bias"])
    assert new["3.weight"].shape == (5, 8) and not torch.equal(new["3.weight"][3:], torch.zeros(2, 8))
    smaller = tmp_path / "smaller.pt"
    reinit(str(mlp_file), "^3\\.", "--out", "2", "--keep", "--init", "zeros", "-o", str(smaller))
    assert torch.equal(torch.load(smaller)["3.weight"], old["3.weight"][:2])


def test_refusals(mlp_file, tmp_path):
    out = str(tmp_path / "x.pt")
    both = run("reinit", str(mlp_file), "^0\\.", "--shape", "3,3", "--out", "3", "--init", "zeros", "-o", out)
    assert both.exit_code == 2 and "use either --shape or --out/--in" in both.stderr
    alone = run("reinit", str(mlp_file), "^0\\.", "--keep", "--init", "zeros", "-o", out)
    assert alone.exit_code == 2 and "give --shape, --out or --in" in alone.stderr
    bad = run("reinit", str(mlp_file), "^0\\.", "--shape", "3,a", "--init", "zeros", "-o", out)
    assert bad.exit_code == 2 and "invalid shape '3,a'" in bad.stderr
    everything = run("reinit", str(mlp_file), "--out", "3", "--init", "zeros", "-o", out)
    assert everything.exit_code == 2 and "select the layer with PATTERN" in everything.stderr


def tiny_bert(num_labels: int):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=60,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=num_labels,
    )
    torch.manual_seed(0)
    return BertForSequenceClassification(config)


@pytest.mark.parametrize("form", ["safetensors", "sharded", "bin"])
def test_bert_classifier_head_grown_from_3_to_7_labels(tmp_path, form):
    from transformers import BertForSequenceClassification

    src, dst = tmp_path / "bert3", tmp_path / "bert7"
    model = tiny_bert(3)
    if form == "bin":
        src.mkdir()
        model.config.save_pretrained(src)
        torch.save(model.state_dict(), src / "pytorch_model.bin")
        target = dst / "pytorch_model.bin"
    else:
        model.save_pretrained(src, max_shard_size="40KB" if form == "sharded" else "5GB")
        target = dst / ("model.safetensors.index.json" if form == "sharded" else "model.safetensors")
    stderr = reinit(
        str(src), "^classifier\\.", "--out", "7", "--init", "normal(std=0.02)", "--seed", "0", "-o", str(target)
    )
    assert "classifier.weight: [3, 16] -> [7, 16]" in stderr and "classifier.bias: [3] -> [7]" in stderr
    if not (dst / "config.json").exists():
        shutil.copy(src / "config.json", dst / "config.json")
    grown, info = BertForSequenceClassification.from_pretrained(dst, num_labels=7, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert grown.classifier.weight.shape == (7, 16) and torch.equal(grown.classifier.bias, torch.zeros(7))
    body = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier")}
    assert all(torch.equal(grown.state_dict()[k], v) for k, v in body.items())
    logits = grown.eval()(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 7)


def tiny_gpt2(vocab_size: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab_size, n_embd=16, n_layer=1, n_head=2, n_positions=32)
    torch.manual_seed(0)
    return GPT2LMHeadModel(config)


def test_gpt2_vocabulary_grown_by_5_tokens_with_its_tied_head(tmp_path):
    from transformers import GPT2LMHeadModel

    model = tiny_gpt2(100)
    src, dst = tmp_path / "gpt2", tmp_path / "grown"
    model.save_pretrained(src)
    stderr = reinit(
        str(src), "wte", "--out", "105", "--keep", "--init", "normal(std=0.02)", "-o", str(dst / "model.safetensors")
    )
    assert "transformer.wte.weight: [100, 16] -> [105, 16], old values kept" in stderr
    assert "5 new rows from the old rows' mean and covariance" in stderr
    shutil.copy(src / "config.json", dst / "config.json")
    grown, info = GPT2LMHeadModel.from_pretrained(dst, vocab_size=105, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    old = model.transformer.wte.weight.detach()
    new = grown.transformer.wte.weight.detach()
    assert new.shape == (105, 16) and torch.equal(new[:100], old)
    assert grown.lm_head.weight.data_ptr() == new.data_ptr()
    # transformers' own resize draws the new rows from the same distribution: the old rows' mean
    reference = tiny_gpt2(100)
    reference.resize_token_embeddings(105)
    assert torch.allclose(new[100:], reference.transformer.wte.weight[100:].detach(), atol=1e-3)
    assert torch.allclose(new[100:], old.mean(0).expand(5, 16), atol=1e-3)
    grown.eval()(torch.tensor([[1, 104]]))


def test_gpt2_state_dict_with_both_names_of_the_tie(tmp_path):
    """A .pt state_dict holds wte and lm_head as one storage: resizing either resizes both, and
    the output loads strictly into the model with the grown vocabulary."""
    model = tiny_gpt2(100)
    src, out = tmp_path / "gpt2.pt", tmp_path / "grown.pt"
    torch.save(model.state_dict(), src)
    stderr = reinit(str(src), "^lm_head", "--out", "105", "--keep", "--init", "normal(std=0.02)", "-o", str(out))
    assert "lm_head.weight (with transformer.wte.weight): [100, 16] -> [105, 16]" in stderr
    state = torch.load(out)
    assert state["lm_head.weight"].data_ptr() == state["transformer.wte.weight"].data_ptr()
    grown = tiny_gpt2(105)
    grown.load_state_dict(state, strict=True)
    assert torch.equal(grown.transformer.wte.weight[:100], model.transformer.wte.weight)


def test_keras_dense_output_and_input(tmp_path):
    import keras

    def build(hidden: int, classes: int):
        return keras.Sequential(
            [keras.Input((4,)), keras.layers.Dense(hidden, name="hidden"), keras.layers.Dense(classes, name="head")]
        )

    keras.utils.set_random_seed(0)
    model = build(8, 3)
    src = tmp_path / "m.weights.h5"
    model.save_weights(src)
    mid = tmp_path / "mid.weights.h5"
    stderr = reinit(str(src), "^layers/dense_1/", "--out", "7", "--keep", "--init", "xavier", "-o", str(mid))
    assert "layers/dense_1/vars/0: [8, 3] -> [8, 7]" in stderr and "layers/dense_1/vars/1: [3] -> [7]" in stderr
    out = tmp_path / "out.weights.h5"
    reinit(str(mid), "^layers/dense/", "--out", "6", "--init", "xavier", "-o", str(mid.with_name("h.weights.h5")))
    reinit(
        str(mid.with_name("h.weights.h5")), "^layers/dense_1/vars/0", "--in", "6", "--init", "xavier", "-o", str(out)
    )
    grown = build(6, 7)
    grown.load_weights(out)
    kernel = np.asarray(grown.layers[1].kernel)
    assert kernel.shape == (6, 7)
    first = build(8, 7)
    first.load_weights(mid)
    assert np.array_equal(np.asarray(first.layers[1].kernel)[:, :3], np.asarray(model.layers[1].kernel))
    assert grown.predict(np.ones((1, 4)), verbose=0).shape == (1, 7)


def test_reinit_with_a_new_shape_resizes_the_optimizer_state(tmp_path):
    model = mlp()
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 4)).sum().backward()
    opt.step()
    path, out = tmp_path / "train.pt", tmp_path / "out.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    stderr = reinit(str(path), "^model\\.3\\.", "--out", "5", "--init", "normal(std=0.02)", "-o", str(out))
    assert "optimizer: state of 3.weight (index 4) reset: moments 0 at [5, 8], step 0" in stderr
    saved = torch.load(out)
    resumed = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 5))
    resumed.load_state_dict(saved["model"], strict=True)
    opt = torch.optim.Adam(resumed.parameters())
    opt.load_state_dict(saved["optimizer"])
    resumed(torch.randn(4, 4)).sum().backward()
    opt.step()
    assert opt.state[resumed[3].weight]["exp_avg"].shape == (5, 8)
    assert json.loads(run("ls", str(out), "--optimizer", "-f", "json").stdout)[-1]["shape"] == [5]


TF_TRAIN = """
import json, sys
import numpy as np
import tensorflow as tf

def build(classes):
    model = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(8), tf.keras.layers.Dense(classes)])
    model.compile(tf.keras.optimizers.Adam(0.01), "mse")
    return model

x = np.ones((8, 4), "float32")
if sys.argv[1] == "save":
    tf.keras.utils.set_random_seed(0)
    model = build(3)
    model.fit(x, np.ones((8, 3)), verbose=0)
    model.save_weights(sys.argv[2])
    print(json.dumps(np.asarray(model.layers[1].kernel).tolist()))
else:
    model = build(5)
    model.load_weights(sys.argv[2]).assert_existing_objects_matched()
    kernel = np.asarray(model.layers[1].kernel).tolist()
    model.fit(x, np.ones((8, 5)), verbose=0)
    print(json.dumps({"kernel": kernel, "iterations": int(model.optimizer.iterations.numpy())}))
"""


def test_tensorflow_checkpoint_head_grown_and_resumed(tmp_path):
    """A TensorFlow checkpoint's Dense head from 3 to 5 units (Keras layout: (in, out)): loads
    into the model built with 5, its optimizer state with it, and training goes on."""
    from reference import run_in

    src, out = tmp_path / "src" / "ckpt", tmp_path / "out" / "ckpt"
    old = run_in("tensorflow", TF_TRAIN, "save", str(src))
    stderr = reinit(str(src), "^layer_with_weights-1/", "--out", "5", "--keep", "--init", "xavier", "-o", str(out))
    assert "layer_with_weights-1/kernel/.ATTRIBUTES/VARIABLE_VALUE: [8, 3] -> [8, 5]" in stderr
    assert "reset: moments 0 at [8, 5]" in stderr
    loaded = run_in("tensorflow", TF_TRAIN, "load", str(out))
    assert np.array_equal(np.asarray(loaded["kernel"], dtype=np.float32)[:, :3], np.asarray(old, dtype=np.float32))
    assert loaded["iterations"] == 2
