"""`check` rules: what a CI gate asks of a checkpoint, each failure named with its rule."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from paramctl.dtypes import FLOATING, check_name
from paramctl.errors import UsageError
from paramctl.stats import summaries
from paramctl.table import Tensor, compile_pattern

Failure = dict[str, Any]


def check(
    tensors: Sequence[Tensor],
    max_abs: float | None = None,
    dtype: str | None = None,
    no_all_zero: bool = False,
    expected: dict[str, dict[str, Any]] | None = None,
    progress: Callable[[Sequence[Tensor]], Iterable[Tensor]] = iter,
) -> list[Failure]:
    """Every rule TENSORS break: no NaN/Inf always; the others when asked for."""
    if dtype is not None:
        check_name(dtype)
    failures: list[Failure] = []

    def fail(name: str, rule: str, detail: str) -> None:
        failures.append({"name": name, "rule": rule, "detail": detail})

    seen = set()
    for t, s in zip(progress(tensors), summaries(tensors)):
        seen.add(t.name)
        if s.nans:
            fail(t.name, "nan", f"{s.nans} NaN of {t.numel}")
        if s.infs:
            fail(t.name, "inf", f"{s.infs} Inf of {t.numel}")
        absmax = s.row()["absmax"]
        if max_abs is not None and absmax is not None and absmax > max_abs:
            fail(t.name, "max-abs", f"|value| reaches {absmax:.6g} > {max_abs:g}")
        if dtype is not None and t.dtype in FLOATING and t.dtype != dtype:
            fail(t.name, "dtype", f"{t.dtype}, expected {dtype}")
        if no_all_zero and t.numel and s.zeros == t.numel:
            fail(t.name, "all-zero", f"all {t.numel} values are zero")
        if expected is not None:
            want = expected.get(t.name)
            if want is None:
                fail(t.name, "extra", "not in the expected list")
                continue
            if list(t.shape) != list(want["shape"]):
                fail(t.name, "shape", f"{list(t.shape)}, expected {list(want['shape'])}")
            if t.dtype != want["dtype"]:
                fail(t.name, "dtype", f"{t.dtype}, expected {want['dtype']}")
    for name in expected or {}:
        if name not in seen:
            fail(name, "missing", "expected but not in the checkpoint")
    return failures


def read_expectations(path: str, pattern: str | None, exclude: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Names, shapes and dtypes from a `paramctl ls --format json` file, filtered like the tensors."""
    try:
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
        expected = {r["name"]: {"shape": list(r["shape"]), "dtype": r["dtype"]} for r in rows}
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise UsageError(f"not a `paramctl ls --format json` list: {e}", path) from None
    keep = compile_pattern(pattern) if pattern else None
    drops = [compile_pattern(p) for p in exclude]
    return {
        name: want
        for name, want in expected.items()
        if (keep is None or keep.search(name)) and not any(d.search(name) for d in drops)
    }
