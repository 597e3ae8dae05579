"""task_arithmetic: base + lambda * sum_i w_i (x_i - base) (mergekit names: weights, lambda).

See _taskvec.py for the exact order of operations; with `normalize` the sum is divided by
the sum of the weights. No statistic pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ._taskvec import TaskVectorMethod, TaskVectorParams


@dataclass(frozen=True)
class TaskArithmeticParams(TaskVectorParams):
    method: ClassVar[str] = "task_arithmetic"


class TaskArithmetic(TaskVectorMethod):
    name = "task_arithmetic"
    params_type = TaskArithmeticParams
