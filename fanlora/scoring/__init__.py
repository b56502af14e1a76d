"""Stage b: how much each (kind, layer) LoRA module matters, by several methods behind one interface."""

from fanlora.score_table import SCORES_FORMAT, ScoreTable
from fanlora.scoring.batches import make_batches, performance, response_nll

__all__ = ["SCORES_FORMAT", "ScoreTable", "make_batches", "performance", "response_nll"]
