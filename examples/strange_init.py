"""The "strange" initializer of Dive into Deep Learning, "Parameter Management", for `reinit`:

    w ~ U(5, 10)     with probability 1/4
        0            with probability 1/2
        U(-10, -5)   with probability 1/4

As the chapter builds it: draw U(-10, 10), then zero every value with |w| < 5 (half of them).

    paramctl reinit model.pt --init examples/strange_init.py:strange --seed 0 -o strange.pt
    paramctl stats strange.pt weight --hist     # the hole in the middle: ▁▁▁▁    █   ▁▁▁▁

Without a PATTERN only weights are drawn this way; biases get 0, as in the chapter, where
`my_init` touches `m.weight` alone.

paramctl calls a custom initializer as `func(tensor, name=, generator=, fan_in=, fan_out=)`:
`tensor` is a float32 torch tensor shaped as stored in the file, `generator` a torch.Generator
seeded by (--seed, name) (use it for every draw, so that --seed reproduces the values), and
`fan_in`/`fan_out` are the fans in the file's layout (None below 2 dimensions). Fill `tensor`
in place, or return a tensor of the same shape; paramctl casts it to the stored dtype.
"""

from __future__ import annotations

import torch


def strange(
    tensor: torch.Tensor,
    *,
    name: str,
    generator: torch.Generator,
    fan_in: int | None,
    fan_out: int | None,
) -> torch.Tensor:
    with torch.no_grad():
        tensor.uniform_(-10, 10, generator=generator)
        tensor *= tensor.abs() >= 5
    return tensor
