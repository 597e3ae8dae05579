"""breadcrumbs: Model Breadcrumbs (Davari & Belilovsky 2023): drop the outliers and the noise.

For every non-base input, rank |x_i - base| over the tensor (exactly: _select.py, ties in
element-index order) and drop the largest `beta` fraction (ceil(beta * numel) elements) and
the smallest `gamma` fraction (ceil(gamma * numel) elements); the band in between is kept
unscaled. The kept deltas are combined as in task_arithmetic (or TIES-style with
sign_election). Two exact selections per input share the statistic passes (typically 2-3).

Naming: beta = top fraction dropped, gamma = bottom fraction dropped. mergekit's
`breadcrumbs` instead takes `density` (the fraction kept) and `gamma` (the top fraction
dropped): mergekit (density=d, gamma=g) is beta=g, gamma=1-d-g here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..stats import k_for_density
from ._taskvec import SelectingMethod, TaskVectorParams


@dataclass(frozen=True)
class BreadcrumbsParams(TaskVectorParams):
    beta: float = 0.01  # fraction of the largest |delta| dropped
    gamma: float = 0.9  # fraction of the smallest |delta| dropped

    method: ClassVar[str] = "breadcrumbs"

    def __post_init__(self) -> None:
        super().__post_init__()
        beta = self._real("beta", lo=0.0, hi=1.0)
        gamma = self._real("gamma", lo=0.0, hi=1.0)
        if beta + gamma > 1.0:
            self._fail("gamma", f"plus beta must be at most 1, got beta={beta}, gamma={gamma}")


class Breadcrumbs(SelectingMethod):
    name = "breadcrumbs"
    params_type = BreadcrumbsParams

    @property
    def tensor_passes(self) -> int:
        trivial = self.params.beta in (0.0, 1.0) and self.params.gamma in (0.0, 1.0)
        return 0 if trivial else super().tensor_passes

    def counts(self, numel: int) -> tuple[int, ...]:
        top = k_for_density(numel, self.params.beta)
        bottom = k_for_density(numel, self.params.gamma)
        return (top, max(top, numel - bottom))  # drop the first, keep the second

    def keep(self, masks: list[torch.Tensor]) -> torch.Tensor:
        dropped, kept = masks
        return kept.logical_and_(dropped.logical_not_())  # in place: the masks are scratch
