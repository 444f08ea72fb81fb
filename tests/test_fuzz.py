"""Fuzzing every reader: mutated files end in a correct table or a clean error, nothing else.

Each case is a valid small checkpoint of one format, mutated by a Hypothesis strategy
(truncation, byte flips, rewritten header fields, shape bombs, offsets past the end, duplicate
and non-UTF-8 names, deep nesting). The outcome must be a table whose every tensor reads, or a
ParamctlError (exit 2); any other exception, more than a few seconds, or an allocation far
beyond the file's size fails the test. The seed is fixed, so CI runs the same cases each time.
"""

from __future__ import annotations

import io
import json
import struct
import time
import tracemalloc
import zipfile
from collections import Counter
from pathlib import Path

import pytest
import torch  # noqa: F401  (imported here once: a case sniffed as a legacy .pt would pay 2 s for it)
from conftest import SAMPLES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import paramctl
from paramctl.errors import ParamctlError

CASES = 600  # per format; a few thousand in all
OUTCOMES: dict[str, Counter] = {}
MAX_SECONDS = 30.0  # a hang guard, not a speed test (tracemalloc slows reading ~3x; CI machines are busy)
MAX_EXTRA_BYTES = 32 << 20  # beyond the file's own size


def outcome(path: Path, fmt: str) -> str:
    """'table' or 'error'; raises (failing the test) on anything else."""
    tracemalloc.start()
    start = time.process_time()
    try:
        ckpt = paramctl.load(str(path))
        for t in ckpt:
            t.array()
        result = "table"
    except ParamctlError as e:
        assert "\n" not in str(e), f"multi-line error: {e!r}"
        result = "error"
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    elapsed = time.process_time() - start
    assert elapsed < MAX_SECONDS, f"{elapsed:.1f} s on a {path.stat().st_size}-byte file"
    assert peak < path.stat().st_size + MAX_EXTRA_BYTES, f"allocated {peak} bytes"
    OUTCOMES.setdefault(fmt, Counter())[result] += 1
    return result


def mutate(data: bytes, draw) -> bytes:
    """Truncate, flip bytes, overwrite a run, or insert junk."""
    kind = draw(st.sampled_from(["truncate", "flip", "overwrite", "insert"]))
    if not data or kind == "truncate":
        return data[: draw(st.integers(0, max(len(data) - 1, 0)))]
    pos = draw(st.integers(0, len(data) - 1))
    if kind == "flip":
        flips = draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(1, 255)), min_size=1, max_size=8))
        buf = bytearray(data)
        for i, x in flips:
            buf[i] ^= x
        return bytes(buf)
    junk = draw(st.binary(min_size=1, max_size=64))
    if kind == "overwrite":
        return data[:pos] + junk + data[pos + len(junk) :]
    return data[:pos] + junk + data[pos:]


def settings_for(cases: int = CASES):
    return settings(
        max_examples=cases,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        database=None,
    )


SOURCES = {
    "pt": SAMPLES / "nested.pt",
    "safetensors": SAMPLES / "mlp.safetensors",
    "hdf5": SAMPLES / "mlp.h5",
    "keras": SAMPLES / "mlp.keras",
}


@pytest.mark.parametrize("fmt", sorted(SOURCES))
def test_mutated_files(tmp_path, fmt):
    original = SOURCES[fmt].read_bytes()
    path = tmp_path / f"case.{fmt}"

    @settings_for()
    @given(st.data())
    def case(data):
        path.write_bytes(mutate(original, data.draw))
        outcome(path, fmt)

    case()


def _legacy_bytes() -> bytes:

    buf = io.BytesIO()
    torch.save({"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(3)}, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


def test_mutated_legacy_pt(tmp_path):
    original = _legacy_bytes()
    path = tmp_path / "case.pt"

    @settings_for(150)  # each case pays torch.load
    @given(st.data())
    def case(data):
        path.write_bytes(mutate(original, data.draw))
        outcome(path, "pt-legacy")

    case()


SAFETENSORS_DTYPES = ["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "X1", 7, None]
INTS = st.one_of(st.integers(-2, 40), st.integers(0, 10**12), st.sampled_from([2**63, 2**64 + 1, -(2**63)]))


@st.composite
def safetensors_headers(draw) -> bytes:
    """Headers with every field rewritten: shape bombs, offsets past the end, odd names, nesting."""
    data = draw(st.binary(min_size=0, max_size=96))
    entries = {}
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.one_of(st.text(max_size=12), st.just("__metadata__"), st.just("a")))
        shape = draw(st.one_of(st.lists(INTS, max_size=4), st.just([10**6, 10**6]), st.just("x"), st.just(None)))
        offsets = draw(st.one_of(st.lists(INTS, min_size=0, max_size=3), st.just([0, len(data)]), st.just(None)))
        entries[name] = {"dtype": draw(st.sampled_from(SAFETENSORS_DTYPES)), "shape": shape, "data_offsets": offsets}
        if draw(st.booleans()):
            entries[name] = draw(st.sampled_from([[], 3, "s", {"dtype": "F32"}, {"nested": {"deep": [1]}}]))
    raw = json.dumps(entries).encode()
    if draw(st.booleans()):  # a duplicate key, which JSON allows and the reference loader rejects
        raw = raw[:-1] + (b', "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}' if entries else b"}")
    if draw(st.booleans()):  # a name that is not UTF-8
        raw = raw.replace(b"a", b"\xff\xfe", 1)
    if draw(st.booleans()):
        raw = b"[" * draw(st.integers(1, 100_000)) + raw
    length = draw(st.one_of(st.just(len(raw)), INTS.filter(lambda n: 0 <= n < 2**64)))
    return struct.pack("<Q", length) + raw + data


def test_rewritten_safetensors_headers(tmp_path):
    path = tmp_path / "case.safetensors"

    @settings_for()
    @given(safetensors_headers())
    def case(blob):
        path.write_bytes(blob)
        outcome(path, "safetensors-header")

    case()


@st.composite
def zips(draw) -> bytes:
    """Zip archives whose members are shuffled, dropped, renamed or given junk pickles."""
    with zipfile.ZipFile(SOURCES["pt"]) as zf:
        members = {i.filename: zf.read(i) for i in zf.infolist()}
    names = list(members)
    dropped = draw(st.lists(st.sampled_from(names), max_size=3))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))) as out:
        for name in names:
            if name in dropped:
                continue
            data = members[name]
            if name.endswith("data.pkl") and draw(st.booleans()):
                data = mutate(data, draw)
            out.writestr(draw(st.sampled_from([name, name, name + "x", "top/" + name])), data)
    return buf.getvalue()


def test_rewritten_zip_archives(tmp_path):
    path = tmp_path / "case.pt"

    @settings_for(300)
    @given(zips())
    def case(blob):
        path.write_bytes(blob)
        outcome(path, "pt-zip-members")

    case()


def test_deeply_nested_pickle_is_a_clean_error(tmp_path):
    deep = b"\x80\x02" + b"]" * 200_000 + b"a" * 199_999 + b"."  # 200,000 nested lists
    path = tmp_path / "deep.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", deep)
    assert outcome(path, "pt-deep") in ("table", "error")


def test_shape_bomb_is_refused_quickly(tmp_path):
    header = json.dumps({"a": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 16]}}).encode()
    path = tmp_path / "bomb.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    assert outcome(path, "bomb") == "error"
