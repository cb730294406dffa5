"""`lmoe compare`: on the user's data (or the built-in mixture), does a mixture beat a LoRA of equal
trainable parameters? config (CompareConfig), runs (train, score, resume, report), items (per-item
scores), stats (paired differences and tables), split (held_out_fraction)."""

from .config import CompareConfig
from .runs import compare

__all__ = ["CompareConfig", "compare"]
