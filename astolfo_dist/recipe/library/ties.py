"""ties: TIES-merging (Yadav et al. 2023): trim, elect sign, disjoint mean.

1. Trim, exactly: for every non-base input, keep the k = ceil(density * numel) largest
   |x_i - base| of the tensor (density read as the decimal it is written as, see
   stats.k_for_density; ties at the threshold kept in element-index order), zero the rest.
   The selection is the exact radix selection of _select.py: one statistic pass on the CPU
   where the first pass's band holds the threshold, else typically 2-3.
   Ties at |delta| = 0 are never split (a zero delta changes no output value).
2. Elect a sign per element from the weighted, trimmed deltas: by their sum ("sum", mass)
   or by the count of signs ("count"); a tie elects +.
3. Disjoint mean: average the deltas that agree with the elected sign, dividing by the sum
   of their weights (`normalize`, on by default), scale by lambda, add to the base.

With sign_election=False and density 1 this is task_arithmetic, bit for bit.
Parameters: density (alias k), weights, lambda, normalize, sign_election, consensus.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..stats import k_for_density
from ._taskvec import SelectingMethod, TaskVectorParams


@dataclass(frozen=True)
class TiesParams(TaskVectorParams):
    sign_election: bool = True
    density: float = 0.2  # fraction of each task vector kept, by magnitude

    method: ClassVar[str] = "ties"
    aliases: ClassVar[dict[str, str]] = {**TaskVectorParams.aliases, "k": "density"}

    def __post_init__(self) -> None:
        super().__post_init__()
        self._real("density", lo=0.0, hi=1.0)


class Ties(SelectingMethod):
    name = "ties"
    params_type = TiesParams

    @property
    def tensor_passes(self) -> int:
        return 0 if self.params.density in (0.0, 1.0) else super().tensor_passes

    def counts(self, numel: int) -> tuple[int, ...]:
        return (k_for_density(numel, self.params.density),)
