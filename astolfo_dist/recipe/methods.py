"""Chunk methods: pure functions from one chunk of each input to one chunk of output.

A method never opens files or knows about workers; it sees tensors on one device. It
walks the inputs in recipe order and uses only elementwise IEEE operations that are
correctly rounded on every backend (copy/convert, add, multiply, divide; no fused
multiply-add), so an element's value does not depend on where a chunk starts or ends,
nor on whether it ran on the CPU or the GPU.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class WeightedSum:
    """out = sum_i w_i * x_i, streamed: one accumulator, never a stack of N inputs.

    Equal weights (the uniform average) add first and divide once, which is one rounding
    fewer per input and one pass less.
    """

    weights: tuple[float, ...]

    @property
    def uniform(self) -> bool:
        return len(set(self.weights)) == 1

    def reduce(
        self, acc: torch.Tensor, tmp: torch.Tensor, chunks: Iterable[torch.Tensor], out: torch.Tensor
    ) -> torch.Tensor:
        """Reduce the chunks into `acc` (the accumulator dtype) and round once into `out`."""
        uniform = self.uniform
        count = 0
        for i, x in enumerate(chunks):
            if i == 0:
                acc.copy_(x)
                if not uniform:
                    acc.mul_(self.weights[0])
                count = 1
                continue
            tmp.copy_(x)
            if not uniform:
                tmp.mul_(self.weights[i])
            acc.add_(tmp)
            count += 1
        if count != len(self.weights):
            raise ValueError(f"expected {len(self.weights)} input chunks, got {count}")
        if uniform and count > 1:
            # Divide and round to the output dtype in one pass, by a divisor tensor on acc's
            # device: CUDA multiplies by the reciprocal of a Python number (library.base.divide_).
            torch.div(acc, torch.full((), count, dtype=acc.dtype, device=acc.device), out=out)
        else:
            out.copy_(acc)
        return out


def weighted_sum(weights: Sequence[float]) -> WeightedSum:
    return WeightedSum(tuple(float(w) for w in weights))
