"""Stage b: how much each (kind, layer) LoRA module matters, by several methods behind one interface."""

from fanlora.scoring.batches import make_batches, performance, response_nll
from fanlora.scoring.table import SCORES_FORMAT, ScoreTable

__all__ = ["SCORES_FORMAT", "ScoreTable", "make_batches", "performance", "response_nll"]
