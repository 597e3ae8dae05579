"""astolfo-dist: merge many model checkpoints in bounded memory."""

__version__ = "0.1.0"

from .errors import AstolfoError, InputError, MergeCancelled, UsageError  # noqa: E402
from .merge import MergeResult, merge  # noqa: E402

__all__ = ["AstolfoError", "InputError", "MergeCancelled", "MergeResult", "UsageError", "__version__", "merge"]
