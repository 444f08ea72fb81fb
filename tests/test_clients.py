"""The ecosystem's own loaders on paramctl's output.

Tiny models built from configs (no downloads) are written the way their libraries write them:
transformers' save_pretrained in single and sharded safetensors, and `.bin` as transformers 4
wrote it (transformers 5 writes safetensors only: torch.save of the state dict, sharded by
huggingface_hub's split_torch_state_dict_into_shards as 4.x did); diffusers' UNet2DModel and a
peft LoRA adapter by their save_pretrained (safetensors and safe_serialization=False); a Lightning
Trainer run writes a real `.ckpt`. paramctl edits and converts them, and each output is loaded by
the library's own loader (from_pretrained with output_loading_info, PeftModel.from_pretrained,
load_from_checkpoint, Trainer.fit(ckpt_path=...)): nothing missing or unexpected unless the edit
meant it, outputs equal where nothing was meant to change and different where something was.
transformers 4.57 (the version most deployed models pin) loads the key outputs too, in its own
environment (.venv-hf4), in one subprocess.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import run
from reference import run_in

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore")

TOKENS = [[5, 17, 2, 99, 41, 8, 63]]
DECODER_TOKENS = [[0, 12, 7]]
SHARD = "20KB"  # a few shards of each tiny model


# --- building the models -------------------------------------------------------------------------


def configs() -> dict[str, tuple[str, Any]]:
    from transformers import BartConfig, BertConfig, GPT2Config, LlamaConfig, T5Config

    small = {"vocab_size": 100}
    return {
        # tied: lm_head.weight is transformer.wte.weight
        "gpt2": (
            "GPT2LMHeadModel",
            GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0, **small),
        ),
        # tied: shared.weight is encoder/decoder.embed_tokens.weight and lm_head.weight
        "t5": (
            "T5ForConditionalGeneration",
            T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2, decoder_start_token_id=0, **small),
        ),
        "llama": (
            "LlamaForCausalLM",
            LlamaConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=1,
                max_position_embeddings=32,
                tie_word_embeddings=False,
                bos_token_id=0,
                eos_token_id=1,
                **small,
            ),
        ),
        # tied: model.shared.weight is both embed_tokens and lm_head.weight
        "bart": (
            "BartForConditionalGeneration",
            BartConfig(
                d_model=32,
                encoder_layers=1,
                decoder_layers=1,
                encoder_attention_heads=2,
                decoder_attention_heads=2,
                encoder_ffn_dim=64,
                decoder_ffn_dim=64,
                max_position_embeddings=32,
                **small,
            ),
        ),
        # tied: the word embeddings are the decoder's weight, and cls.predictions.bias its bias
        "bert-mlm": (
            "BertForMaskedLM",
            BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, **small),
        ),
        "bert": (
            "BertForSequenceClassification",
            BertConfig(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=32,
                num_labels=3,
                **small,
            ),
        ),
    }


def outputs(model: Any) -> torch.Tensor:
    """The model's logits on a fixed input (a UNet's prediction for a fixed sample)."""
    with torch.no_grad():
        if hasattr(model, "time_embedding"):  # a diffusers UNet
            generator = torch.Generator().manual_seed(0)
            return model(torch.randn(1, 1, 8, 8, generator=generator), 3).sample
        inputs = {"input_ids": torch.tensor(TOKENS)}
        if model.config.is_encoder_decoder:
            inputs["decoder_input_ids"] = torch.tensor(DECODER_TOKENS)
        return model(**inputs).logits


def save_bin(model: Any, directory: Path, shard_size: str | None = None) -> None:
    """As transformers 4 wrote `.bin`: torch.save of the state dict (ties shared), in shards
    named by split_torch_state_dict_into_shards, plus the configs."""
    from huggingface_hub import split_torch_state_dict_into_shards

    directory.mkdir(parents=True)
    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(directory)
    state = model.state_dict()
    split = split_torch_state_dict_into_shards(
        state, filename_pattern="pytorch_model{suffix}.bin", max_shard_size=shard_size or "5GB"
    )
    for file, names in split.filename_to_tensors.items():
        torch.save({name: state[name] for name in names}, directory / file)
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))


@dataclass
class Built:
    """A model written in several forms: FORMS maps a form (st, st-sharded, bin, bin-sharded) to
    its directory; LOGITS are the model's outputs; STATE its state dict."""

    cls: Any
    forms: dict[str, Path]
    logits: torch.Tensor
    state: dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Built]:
    root = tmp_path_factory.mktemp("zoo")
    built = {}
    for name, (class_name, config) in configs().items():
        cls = getattr(transformers, class_name)
        torch.manual_seed(0)
        model = cls(config).eval()
        forms = {form: root / f"{name}-{form}" for form in ("st", "st-sharded", "bin", "bin-sharded")}
        model.save_pretrained(forms["st"])
        model.save_pretrained(forms["st-sharded"], max_shard_size=SHARD)
        save_bin(model, forms["bin"])
        save_bin(model, forms["bin-sharded"], SHARD)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        built[name] = Built(cls, forms, outputs(model), state)
    return built


# --- helpers -------------------------------------------------------------------------------------


def paramctl(*args: Any) -> str:
    """Run paramctl in-process; it must succeed. Its standard error."""
    result = run(*(str(a) for a in args))
    assert result.exit_code == 0, result.stderr
    return result.stderr


def load(cls: Any, path: Path, **kwargs: Any) -> tuple[Any, dict[str, list]]:
    """from_pretrained with its loading info, which must hold no error messages."""
    model, info = cls.from_pretrained(path, output_loading_info=True, **kwargs)
    assert not info.get("error_msgs"), info
    return model.eval(), {k: sorted(v) for k, v in info.items() if k != "error_msgs"}


CLEAN = {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}


def load_clean(cls: Any, path: Path, **kwargs: Any) -> Any:
    model, info = load(cls, path, **kwargs)
    assert info == CLEAN, info
    return model


def safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def weights_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if re.search(r"\.(safetensors|bin)$|\.index\.json$", p.name))


def shard_files(stem: str, ext: str, directory: Path) -> list[str]:
    """The shard names DIRECTORY must hold if it is sharded as transformers names shards."""
    shards = [n for n in weights_files(directory) if n.startswith(stem + "-")]
    count = len(shards)
    assert count > 1, weights_files(directory)
    return [f"{stem}-{i:05d}-of-{count:05d}{ext}" for i in range(1, count + 1)] + [f"{stem}{ext}.index.json"]


def expected_files(target: str, directory: Path, stem: str = "model") -> list[str]:
    ext = ".safetensors" if target.startswith("st") else ".bin"
    stem = stem if ext == ".safetensors" or stem != "model" else "pytorch_model"
    if target.endswith("sharded"):
        return shard_files(stem, ext, directory)
    return [stem + ext]


# --- transformers: every form to every form ------------------------------------------------------

TARGETS = {
    "st": ("--to", "safetensors", "--shard-size", "5GB"),  # transformers' default: one file here
    "st-sharded": ("--to", "safetensors", "--shard-size", SHARD),
    "bin": ("--to", "pt", "--shard-size", "5GB"),
    "bin-sharded": ("--to", "pt", "--shard-size", SHARD),
}
FORMS = ("st", "st-sharded", "bin", "bin-sharded")
CONVERSIONS = (
    [("gpt2", s, t) for s in FORMS for t in TARGETS]
    + [(m, "bin", t) for m in ("bart", "bert-mlm") for t in ("st", "st-sharded")]
    + [(m, s, t) for m in ("t5", "llama", "bert") for s in ("st-sharded", "bin") for t in ("st", "bin-sharded")]
)
# the name safetensors keeps of each tie group, as transformers keeps it: the first in module order
EMBEDS = ["encoder.embed_tokens.weight", "decoder.embed_tokens.weight"]
KEPT = {
    "gpt2": (["transformer.wte.weight"], ["lm_head.weight"]),
    "t5": (["shared.weight"], [*EMBEDS, "lm_head.weight"]),
    "bart": (["model.shared.weight"], [*(f"model.{n}" for n in EMBEDS), "lm_head.weight"]),
    # a bias tie too: the decoder's bias is the prediction head's
    "bert-mlm": (
        ["bert.embeddings.word_embeddings.weight", "cls.predictions.bias"],
        ["cls.predictions.decoder.weight", "cls.predictions.decoder.bias"],
    ),
}


@pytest.mark.parametrize("model,source,target", CONVERSIONS)
def test_convert_loads_in_transformers_with_equal_logits(zoo, tmp_path, model, source, target):
    built = zoo[model]
    out = tmp_path / "out"
    note = paramctl("convert", built.forms[source], f"{out}/", *TARGETS[target])
    assert "config.json" in note  # the source directory's configs come along
    assert weights_files(out) == sorted(expected_files(target, out))
    assert (out / "config.json").read_bytes() == (built.forms[source] / "config.json").read_bytes()
    loaded = load_clean(built.cls, out)
    assert torch.equal(outputs(loaded), built.logits)
    for file in out.glob("*.safetensors"):
        header = safetensors_header(file)
        assert header["__metadata__"]["format"] == "pt"
        if model in KEPT:
            assert not set(KEPT[model][1]) & set(header)
    if target.startswith("st") and model in KEPT:
        stored = {name for f in out.glob("*.safetensors") for name in safetensors_header(f)}
        assert set(KEPT[model][0]) <= stored


def test_a_sharded_directory_keeps_its_layout_and_naming_in_another_format(zoo, tmp_path):
    built = zoo["gpt2"]
    source = built.forms["st-sharded"]
    out = tmp_path / "out"
    paramctl("convert", source, f"{out}/", "--to", "pt")  # no --shard-size: the source's layout
    shards = [n for n in weights_files(source) if n.endswith(".safetensors")]
    assert weights_files(out) == sorted(
        [n.replace("model-", "pytorch_model-").replace(".safetensors", ".bin") for n in shards]
        + ["pytorch_model.bin.index.json"]
    )
    assert torch.equal(outputs(load_clean(built.cls, out)), built.logits)


def test_a_directory_written_again_holds_only_the_new_checkpoint(zoo, tmp_path):
    """from_pretrained reads a `model.safetensors` before an index: the shards written into a
    directory that held one replace it, and one file written later replaces the shards."""
    built = zoo["gpt2"]
    out = tmp_path / "out"
    paramctl("convert", built.forms["bin"], f"{out}/", "--to", "safetensors")
    # an edit of the sharded form keeps its shards
    note = paramctl("reinit", built.forms["st-sharded"], r"^transformer\.h\.1\.", "--init", "zeros", "-o", out)
    assert "removed model.safetensors" in note
    assert weights_files(out) == shard_files("model", ".safetensors", out)
    assert torch.equal(load_clean(built.cls, out).transformer.h[1].mlp.c_fc.bias, torch.zeros(128))
    paramctl("convert", built.forms["bin"], out, "--to", "safetensors")
    assert weights_files(out) == ["model.safetensors"]
    assert torch.equal(outputs(load_clean(built.cls, out)), built.logits)


def test_missing_parent_directories_of_the_output_are_created(zoo, tmp_path):
    from safetensors.torch import load_file

    built = zoo["gpt2"]
    file = tmp_path / "new" / "deeper" / "model.safetensors"
    paramctl("convert", built.forms["bin"], file)
    assert sorted(load_file(file)) == sorted(n for n in built.state if n != "lm_head.weight")
    directory = tmp_path / "other" / "deeper"
    paramctl("convert", built.forms["bin"], f"{directory}/", "--to", "safetensors")
    assert torch.equal(outputs(load_clean(built.cls, directory)), built.logits)


# --- transformers: edits ------------------------------------------------------------------------


def test_reinit_changes_the_selected_weights_and_nothing_else(zoo, tmp_path):
    built = zoo["gpt2"]
    out = tmp_path / "out"
    paramctl(
        "reinit",
        built.forms["st"],
        r"^transformer\.h\.0\.mlp\.",
        "--init",
        "normal(std=0.5)",
        "--seed",
        "1",
        "-o",
        f"{out}/",
    )
    loaded = load_clean(built.cls, out)
    state = loaded.state_dict()
    changed = [n for n in built.state if not torch.equal(state[n], built.state[n])]
    assert changed == [n for n in built.state if n.startswith("transformer.h.0.mlp.")]
    assert not torch.equal(outputs(loaded), built.logits)


@pytest.mark.parametrize("source", ["bin", "st-sharded"])
def test_reinit_of_a_tied_embedding_changes_the_head_too(zoo, tmp_path, source):
    built = zoo["gpt2"]
    out = tmp_path / "out"
    paramctl(
        "reinit",
        built.forms[source],
        r"^lm_head\.weight$|^transformer\.wte\.weight$",
        "--init",
        "normal(std=0.5)",
        "-o",
        f"{out}/",
        "--to",
        "safetensors",
    )
    loaded = load_clean(built.cls, out)
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    assert not torch.equal(loaded.transformer.wte.weight, built.state["transformer.wte.weight"])
    file_values = paramctl_values(out, "transformer.wte.weight")
    assert torch.equal(loaded.transformer.wte.weight, file_values)


def paramctl_values(directory: Path, name: str) -> torch.Tensor:
    """A tensor's values as paramctl reads them from DIRECTORY (json of `show`)."""
    from safetensors import safe_open

    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            if name in f.keys():  # noqa: SIM118 (safe_open is no dict)
                return f.get_tensor(name)
    raise AssertionError(f"{name} not stored in {directory}")


def test_set_writes_the_value_and_the_model_sees_it(zoo, tmp_path):
    built = zoo["llama"]
    out = tmp_path / "out"
    paramctl("set", built.forms["st-sharded"], "model.norm.weight[:4]", "2.5", "-o", f"{out}/")
    loaded = load_clean(built.cls, out)
    expected = built.state["model.norm.weight"].clone()
    expected[:4] = 2.5
    assert torch.equal(loaded.model.norm.weight, expected)
    assert not torch.equal(outputs(loaded), built.logits)


@pytest.mark.parametrize("model", ["gpt2", "t5"])
def test_cast_to_float16_loads_as_the_model_cast_by_torch(zoo, tmp_path, model):
    built = zoo[model]
    out = tmp_path / "out"
    paramctl("cast", built.forms["bin"], "--dtype", "float16", "-o", f"{out}/", "--to", "safetensors")
    loaded = load_clean(built.cls, out, dtype=torch.float16)
    state = loaded.state_dict()
    for name, value in built.state.items():  # T5 keeps its `wo` layers in float32 (_keep_in_fp32_modules)
        assert state[name].dtype == (torch.float32 if ".wo." in name else torch.float16), name
        assert torch.equal(state[name], value.half().to(state[name].dtype)), name


def test_rename_there_and_back_gives_the_model_back(zoo, tmp_path):
    """As after DistributedDataParallel: every name under `module.`, then stripped."""
    built = zoo["t5"]
    wrapped, out = tmp_path / "ddp.bin", tmp_path / "out"
    paramctl("rename", built.forms["bin"], "s/^/module./", "-o", wrapped)
    assert all(n.startswith("module.") for n in torch.load(wrapped, weights_only=True))
    shutil.copytree(built.forms["bin"], out, ignore=shutil.ignore_patterns("*.bin"))
    paramctl("rename", wrapped, r"s/^module\.//", "-o", out / "model.safetensors")
    loaded = load_clean(built.cls, out)
    assert torch.equal(outputs(loaded), built.logits)
    assert list(safetensors_header(out / "model.safetensors"))[:2] == ["__metadata__", "shared.weight"]


def test_rm_of_a_tied_duplicate_leaves_a_model_that_loads(zoo, tmp_path):
    built = zoo["gpt2"]
    out = tmp_path / "out"
    paramctl("rm", built.forms["bin"], r"^lm_head\.weight$", "-o", f"{out}/")
    assert "lm_head.weight" not in torch.load(out / "pytorch_model.bin", weights_only=True)
    assert torch.equal(outputs(load_clean(built.cls, out)), built.logits)


def test_rm_of_a_classifier_head_is_reported_missing_and_nothing_else(zoo, tmp_path):
    built = zoo["bert"]
    out = tmp_path / "out"
    paramctl("rm", built.forms["st"], r"^classifier\.", "-o", f"{out}/")
    _, info = load(built.cls, out)
    assert info == {**CLEAN, "missing_keys": ["classifier.bias", "classifier.weight"]}


def test_untie_stores_both_names_and_still_loads(zoo, tmp_path):
    built = zoo["gpt2"]
    out = tmp_path / "out"
    paramctl("untie", built.forms["bin"], "-o", f"{out}/", "--to", "safetensors")
    header = safetensors_header(out / "model.safetensors")
    assert {"lm_head.weight", "transformer.wte.weight"} <= set(header)
    assert header["__metadata__"] == {"format": "pt"}
    assert torch.equal(outputs(load_clean(built.cls, out)), built.logits)


def tie_llama(built: Built, out: Path, src: str, dst: str, form: str = "st") -> None:
    paramctl("tie", built.forms[form], src, dst, "-o", f"{out}/")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))


def test_tie_keeps_src_and_declares_dst_as_its_alias(zoo, tmp_path):
    built = zoo["llama"]
    out = tmp_path / "out"
    tie_llama(built, out, "model.embed_tokens.weight", "lm_head.weight")
    header = safetensors_header(out / "model.safetensors")
    assert "model.embed_tokens.weight" in header and "lm_head.weight" not in header
    assert header["__metadata__"] == {"format": "pt", "lm_head.weight": "model.embed_tokens.weight"}
    loaded = load_clean(built.cls, out)
    assert torch.equal(loaded.lm_head.weight, built.state["model.embed_tokens.weight"])
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    # the other way round, SRC is kept, though it comes later in the file and the alphabet
    other = tmp_path / "other"
    tie_llama(built, other, "lm_head.weight", "model.embed_tokens.weight")
    header = safetensors_header(other / "model.safetensors")
    assert header["__metadata__"] == {"format": "pt", "model.embed_tokens.weight": "lm_head.weight"}
    assert torch.equal(paramctl_values(other, "lm_head.weight"), built.state["lm_head.weight"])


# --- transformers 4.57 ---------------------------------------------------------------------------

HF4_SCRIPT = """
import json, sys
import torch
import transformers

results = []
for class_name, path, base in json.loads(sys.argv[1]):
    cls = getattr(transformers, class_name)
    try:
        if base:  # a peft adapter on the base model in BASE
            from peft import PeftModel

            model = PeftModel.from_pretrained(cls.from_pretrained(base), path)
            loaded = model.load_adapter(path, adapter_name="check")
            info = {"missing_keys": [k for k in loaded.missing_keys if "lora_" in k]}
            info.update(unexpected_keys=loaded.unexpected_keys, mismatched_keys=[])
        else:
            model, info = cls.from_pretrained(path, output_loading_info=True, torch_dtype=torch.float32)
        model.eval()
        inputs = {"input_ids": torch.tensor(json.loads(sys.argv[2]))}
        if model.config.is_encoder_decoder:
            inputs["decoder_input_ids"] = torch.tensor(json.loads(sys.argv[3]))
        with torch.no_grad():
            logits = model(**inputs).logits.float().tolist()
        info = {k: sorted(v) for k, v in info.items() if k != "error_msgs"}
        results.append({"info": info, "logits": logits})
    except Exception as e:
        results.append({"error": f"{type(e).__name__}: {e}"[:500]})
print(json.dumps([transformers.__version__, results]))
"""


def test_transformers_4_loads_the_outputs(zoo, lora, tmp_path):
    """transformers 4.57 refuses safetensors without `format` metadata and, given GPT-2 with
    `lm_head.weight` kept instead of `transformer.wte.weight`, loads a model whose embeddings
    stay on the meta device. paramctl's outputs load there as in transformers 5."""
    from safetensors.torch import save_file

    gpt2, t5, llama = zoo["gpt2"], zoo["t5"], zoo["llama"]
    cases: list[tuple[Built, Path]] = []

    def convert(built: Built, source: str, name: str, *args: str) -> None:
        out = tmp_path / name
        paramctl("convert", built.forms[source], f"{out}/", *args)
        cases.append((built, out))

    convert(gpt2, "bin", "gpt2-st", "--to", "safetensors")
    convert(gpt2, "bin", "gpt2-st-sharded", "--to", "safetensors", "--shard-size", SHARD)
    convert(gpt2, "bin-sharded", "gpt2-st-from-shards", "--to", "safetensors", "--shard-size", "5GB")
    convert(gpt2, "st-sharded", "gpt2-bin", "--to", "pt", "--shard-size", "5GB")
    convert(gpt2, "st", "gpt2-bin-sharded", "--to", "pt", "--shard-size", SHARD)
    convert(t5, "bin", "t5-st", "--to", "safetensors")
    convert(zoo["bart"], "bin", "bart-st-sharded", "--to", "safetensors", "--shard-size", SHARD)
    convert(zoo["bert-mlm"], "bin", "bert-mlm-st", "--to", "safetensors")
    convert(t5, "bin", "t5-st-sharded", "--to", "safetensors", "--shard-size", SHARD)
    reinit = tmp_path / "gpt2-reinit"
    paramctl("reinit", gpt2.forms["bin"], "wte", "--init", "normal(std=0.5)", "-o", f"{reinit}/", "--to", "safetensors")
    cases.append((gpt2, reinit))
    tied = tmp_path / "llama-tied"
    tie_llama(llama, tied, "model.embed_tokens.weight", "lm_head.weight")
    cases.append((llama, tied))
    tied_shards = tmp_path / "llama-tied-shards"
    tie_llama(llama, tied_shards, "model.embed_tokens.weight", "lm_head.weight", "st-sharded")
    cases.append((llama, tied_shards))
    half = tmp_path / "t5-half"
    paramctl("cast", t5.forms["st"], "--dtype", "float16", "-o", f"{half}/")
    cases.append((t5, half))
    # safetensors metadata without `format` (a training script's note): 4.57 refuses the file,
    # and loads what paramctl writes from it, which keeps the note
    bare = tmp_path / "bare"
    shutil.copytree(llama.forms["st"], bare, ignore=shutil.ignore_patterns("*.safetensors"))
    save_file({k: v.contiguous() for k, v in llama.state.items()}, bare / "model.safetensors", {"step": "100"})
    cases.append((llama, bare))
    edited = tmp_path / "bare-edited"
    paramctl("convert", bare, f"{edited}/")
    assert safetensors_header(edited / "model.safetensors")["__metadata__"] == {"format": "pt", "step": "100"}
    cases.append((llama, edited))

    # a peft adapter converted to .bin, and its B zeroed, on the tiny GPT-2
    adapter, identity = tmp_path / "adapter-bin", tmp_path / "adapter-identity"
    paramctl("convert", lora.forms["st"], f"{adapter}/", "--to", "pt")
    paramctl("reinit", lora.forms["bin"], "lora_B", "--init", "zeros", "-o", f"{identity}/")
    args = [[b.cls.__name__, str(path), None] for b, path in cases]
    args += [[gpt2.cls.__name__, str(path), str(gpt2.forms["st"])] for path in (adapter, identity)]
    version, results = run_in(
        "transformers4", HF4_SCRIPT, json.dumps(args), json.dumps(TOKENS), json.dumps(DECODER_TOKENS)
    )
    assert version == "4.57.6"
    *results, adapted, identical = results
    assert adapted.get("info") == identical.get("info") == CLEAN, (adapted, identical)
    assert torch.allclose(torch.tensor(adapted["logits"]), lora.logits, atol=1e-5)
    assert torch.allclose(torch.tensor(identical["logits"]), gpt2.logits, atol=1e-5)
    for (built, path), result in zip(cases, results):
        if path == bare:
            assert "File metadata is not" in result["error"], result
            continue
        assert "error" not in result, (path.name, result)
        assert result["info"] == CLEAN, (path.name, result["info"])
        expected = outputs(load_clean(built.cls, path, dtype=torch.float32))
        assert torch.allclose(torch.tensor(result["logits"]), expected, atol=1e-5), path.name


# --- diffusers -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unet(tmp_path_factory) -> Built:
    diffusers = pytest.importorskip("diffusers")
    root = tmp_path_factory.mktemp("unet")
    torch.manual_seed(0)
    model = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).eval()
    forms = {form: root / form for form in ("st", "st-sharded", "bin")}
    model.save_pretrained(forms["st"])
    model.save_pretrained(forms["st-sharded"], max_shard_size=SHARD)
    model.save_pretrained(forms["bin"], safe_serialization=False)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return Built(diffusers.UNet2DModel, forms, outputs(model), state)


UNET_CONVERSIONS = {
    ("st", "st-sharded"): ("--shard-size", SHARD),
    ("st-sharded", "st"): ("--shard-size", "5GB"),
    ("st", "bin"): ("--to", "pt"),
    ("bin", "st"): ("--to", "safetensors"),
    ("bin", "st-sharded"): ("--to", "safetensors", "--shard-size", SHARD),
    ("st-sharded", "bin-sharded"): ("--to", "pt"),  # the source's layout, in .bin shards
}


@pytest.mark.parametrize("source,target", UNET_CONVERSIONS)
def test_diffusers_unet_keeps_its_file_names_and_loads(unet, tmp_path, source, target):
    out = tmp_path / "out"
    paramctl("convert", unet.forms[source], f"{out}/", *UNET_CONVERSIONS[source, target])
    assert weights_files(out) == sorted(expected_files(target, out, "diffusion_pytorch_model"))
    assert (out / "config.json").exists()
    # diffusers looks for the .bin index only when told not to prefer safetensors
    options = {"use_safetensors": False} if target == "bin-sharded" else {}
    assert torch.equal(outputs(load_clean(unet.cls, out, **options)), unet.logits)


def test_diffusers_unet_edits(unet, tmp_path):
    zeros, half, without = tmp_path / "zeros", tmp_path / "half", tmp_path / "without"
    paramctl("reinit", unet.forms["st-sharded"], "^conv_out\\.", "--init", "zeros", "-o", f"{zeros}/")
    assert torch.equal(outputs(load_clean(unet.cls, zeros)), torch.zeros_like(unet.logits))
    paramctl("cast", unet.forms["bin"], "--dtype", "float16", "-o", f"{half}/")
    state = load_clean(unet.cls, half, torch_dtype=torch.float16).state_dict()
    assert all(torch.equal(state[n], v.half()) for n, v in unet.state.items())
    paramctl("rm", unet.forms["st"], "^conv_out\\.bias$", "-o", f"{without}/")
    assert load(unet.cls, without)[1] == {**CLEAN, "missing_keys": ["conv_out.bias"]}


@pytest.mark.parametrize("form", ["st", "st-sharded"])
def test_an_edit_in_place_of_a_directory_keeps_its_files(unet, tmp_path, form):
    copy = tmp_path / "copy"
    shutil.copytree(unet.forms[form], copy)
    before = sorted(p.name for p in copy.iterdir())
    paramctl("set", copy, "conv_out.bias", "1.5", "--in-place")
    assert sorted(p.name for p in copy.iterdir()) == before
    loaded = load_clean(unet.cls, copy)
    assert torch.equal(loaded.conv_out.bias, torch.full((1,), 1.5))


# --- peft ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora(zoo, tmp_path_factory) -> Built:
    """A LoRA adapter (B not zero, so it changes the logits) on the tiny GPT-2."""
    peft = pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("lora")
    base = zoo["gpt2"].cls.from_pretrained(zoo["gpt2"].forms["st"]).eval()
    torch.manual_seed(0)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False)).eval()
    forms = {"st": root / "st", "bin": root / "bin"}
    model.save_pretrained(forms["st"])
    model.save_pretrained(forms["bin"], safe_serialization=False)
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
    return Built(peft.PeftModel, forms, outputs(model), state)


def load_adapter(zoo: dict[str, Built], path: Path) -> Any:
    """PeftModel.from_pretrained on a fresh base; loading the adapter must match every key."""
    from peft import PeftModel

    base = zoo["gpt2"].cls.from_pretrained(zoo["gpt2"].forms["st"])
    model = PeftModel.from_pretrained(base, path).eval()
    result = model.load_adapter(path, adapter_name="check")
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "lora_" in k], result
    return model


@pytest.mark.parametrize(
    "source,to,written", [("st", "pt", "adapter_model.bin"), ("bin", "safetensors", "adapter_model.safetensors")]
)
def test_peft_adapter_converted_loads_with_equal_logits(zoo, lora, tmp_path, source, to, written):
    out = tmp_path / "out"
    note = paramctl("convert", lora.forms[source], f"{out}/", "--to", to)
    assert "adapter_config.json" in note
    assert weights_files(out) == [written]
    assert torch.equal(outputs(load_adapter(zoo, out)), lora.logits)


def test_peft_adapter_edits(zoo, lora, tmp_path):
    identity, doubled = tmp_path / "identity", tmp_path / "doubled"
    # B = 0 makes the adapter a no-op: the base model's logits, exactly
    paramctl("reinit", lora.forms["st"], "lora_B", "--init", "zeros", "-o", f"{identity}/")
    assert torch.equal(outputs(load_adapter(zoo, identity)), zoo["gpt2"].logits)
    paramctl("set", lora.forms["bin"], "lora_A", "--expr", "x * 2", "-o", f"{doubled}/")
    model = load_adapter(zoo, doubled)
    for name, value in model.state_dict().items():
        if "lora_A" in name and ".default." in name:
            assert torch.equal(value, lora.state[name] * 2), name
    assert not torch.equal(outputs(model), lora.logits)


# --- Lightning -----------------------------------------------------------------------------------


@dataclass
class Run:
    module: Any  # the LightningModule class
    ckpt: Path  # what ModelCheckpoint wrote after 3 steps
    trainer: Any  # a Trainer factory: trainer(max_epochs, root)
    data: Any


@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory) -> Run:
    L = pytest.importorskip("lightning")
    from torch import nn

    class Regressor(L.LightningModule):
        def __init__(self, width: int = 8) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 1))

        def training_step(self, batch: Any, _: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=0.01)

    root = tmp_path_factory.mktemp("lightning")
    generator = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(12, 4, generator=generator), torch.randn(12, 1, generator=generator)
    )

    def trainer(max_epochs: int, root: Path) -> Any:
        return L.Trainer(
            max_epochs=max_epochs,
            default_root_dir=root,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            devices=1,
        )

    torch.manual_seed(0)
    trainer(1, root).fit(Regressor(), torch.utils.data.DataLoader(data, batch_size=4))
    (ckpt,) = (root / "checkpoints").glob("*.ckpt")
    return Run(Regressor, ckpt, trainer, data)


def resume(run: Run, ckpt: Path) -> Any:
    """Trainer.fit from CKPT for one more epoch (3 steps), checkpointing beside CKPT; the trainer."""
    torch.manual_seed(0)
    trainer = run.trainer(2, ckpt.parent)
    trainer.fit(run.module(), torch.utils.data.DataLoader(run.data, batch_size=4), ckpt_path=ckpt)
    assert trainer.global_step == 6  # resumed at step 3, not started afresh
    return trainer


def test_lightning_checkpoint_reinit_loads_and_resumes(lightning_run, tmp_path):
    original = lightning_run.module.load_from_checkpoint(lightning_run.ckpt).state_dict()
    out = tmp_path / "reinit.ckpt"
    paramctl(
        "reinit", lightning_run.ckpt, r"^state_dict\.net\.0\.weight$", "--init", "xavier", "--seed", "0", "-o", out
    )
    written = torch.load(out, weights_only=False)
    assert set(written) == set(torch.load(lightning_run.ckpt, weights_only=False))  # loops, callbacks, hparams kept
    model = lightning_run.module.load_from_checkpoint(out)
    state = model.state_dict()
    assert torch.equal(state["net.0.weight"], written["state_dict"]["net.0.weight"])
    assert not torch.equal(state["net.0.weight"], original["net.0.weight"])
    assert all(torch.equal(state[n], v) for n, v in original.items() if n != "net.0.weight")
    resume(lightning_run, out)


def test_lightning_checkpoint_rename_there_and_back_resumes(lightning_run, tmp_path):
    renamed, back = tmp_path / "renamed.ckpt", tmp_path / "back.ckpt"
    paramctl("rename", lightning_run.ckpt, r"s/^state_dict\.net\./state_dict.body./", "-o", renamed)
    assert "body.0.weight" in torch.load(renamed, weights_only=False)["state_dict"]
    paramctl("rename", renamed, r"s/^state_dict\.body\./state_dict.net./", "-o", back)
    assert run("diff", str(lightning_run.ckpt), str(back)).exit_code == 0
    resume(lightning_run, back)


def test_lightning_checkpoint_set_and_cast_load(lightning_run, tmp_path):
    original = lightning_run.module.load_from_checkpoint(lightning_run.ckpt).state_dict()
    edited, half = tmp_path / "set.ckpt", tmp_path / "half.ckpt"
    paramctl("set", lightning_run.ckpt, "state_dict.net.2.bias", "0.5", "-o", edited)
    assert torch.equal(lightning_run.module.load_from_checkpoint(edited).net[2].bias, torch.tensor([0.5]))
    paramctl("cast", lightning_run.ckpt, r"^state_dict\.", "--dtype", "float16", "-o", half)
    assert torch.load(half, weights_only=False)["state_dict"]["net.0.weight"].dtype == torch.float16
    state = lightning_run.module.load_from_checkpoint(half).state_dict()
    assert all(torch.equal(state[n], v.half().float()) for n, v in original.items())


def test_lightning_checkpoint_written_into_a_directory_keeps_its_name_and_entries(lightning_run, tmp_path):
    out = tmp_path / "out"
    result = run("convert", str(lightning_run.ckpt), f"{out}/")
    assert result.exit_code == 0 and result.stderr == ""  # one .ckpt: no "holds tensors only" warning
    assert [p.name for p in out.iterdir()] == [lightning_run.ckpt.name]
    written = out / lightning_run.ckpt.name
    assert torch.load(written, weights_only=False).keys() == torch.load(lightning_run.ckpt, weights_only=False).keys()
    resume(lightning_run, written)
