"""Tensors followed across a run's checkpoints (`stats --trend`): per tensor, per checkpoint in
order, its statistics and how far it moved since the previous checkpoint.

Checkpoints are ordered by the numbers in their paths, compared as numbers (`checkpoint-200`
before `checkpoint-1000`, where a shell glob sorts them the other way); `step` is the last number
in a path (the checkpoint's position when its path has none). rel_change is
||x - previous|| / ||previous||, streamed as `diff` computes it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from paramctl.table import Checkpoint, Tensor

COLUMNS = ["name", "checkpoint", "step", "numel", "mean", "std", "absmax", "norm", "rel_change", "nans", "infs"]


def natural_key(path: str) -> list[Any]:
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", path)]


def step_of(path: str, position: int) -> int:
    numbers = re.findall(r"\d+", path.rstrip("/"))
    return int(numbers[-1]) if numbers else position


def ordered(paths: Iterable[str]) -> list[str]:
    return sorted(paths, key=natural_key)


def trend_rows(
    checkpoints: Sequence[tuple[str, Checkpoint]], pattern: str | None, exclude: Iterable[str] = ()
) -> list[dict[str, Any]]:
    """Rows grouped by tensor (in the first checkpoint's order, then names that appear later),
    one per checkpoint that holds it, in the order given."""
    from paramctl.diff import accumulate
    from paramctl.stats import summaries

    per_checkpoint: list[tuple[str, int, dict[str, tuple[Tensor, dict[str, Any]]]]] = []
    for position, (path, ckpt) in enumerate(checkpoints):
        tensors = ckpt.select(pattern, exclude)
        found = {t.name: (t, s.row()) for t, s in zip(tensors, summaries(tensors))}
        per_checkpoint.append((path, step_of(path, position), found))
    names = list(dict.fromkeys(name for _, _, found in per_checkpoint for name in found))
    rows = []
    for name in names:
        previous: Tensor | None = None
        for path, step, found in per_checkpoint:
            if name not in found:
                previous = None
                continue
            t, stats = found[name]
            change = None
            if previous is not None and previous.shape == t.shape:
                change = accumulate(t, previous, None).metrics()["rel_l2"]
            row = {"name": name, "checkpoint": path, "step": step, "numel": t.numel, **stats, "rel_change": change}
            rows.append(row)
            previous = t
    return rows
