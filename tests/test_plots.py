"""The three figures of a run: real PNG files whose pixels show the scores and the setting."""

from __future__ import annotations

import numpy as np
from matplotlib import image

from fanlora.scoring.table import ScoreTable
from fanlora.stages.plots import write_all
from fanlora.stages.selection import select

KINDS = ["Q", "K", "V", "O", "G", "U", "D"]
PATHS = {
    "Q": "self_attn.q_proj", "K": "self_attn.k_proj", "V": "self_attn.v_proj", "O": "self_attn.o_proj",
    "G": "mlp.gate_proj", "U": "mlp.up_proj", "D": "mlp.down_proj",
}  # fmt: skip


def table(values: dict[str, float]) -> ScoreTable:
    names = {f"{k}.{n}": f"model.layers.{n}.{PATHS[k]}" for k in KINDS for n in range(3)}
    return ScoreTable(backbone={"name": "t"}, kinds=KINDS, num_layers=3, module_names=names, values=values)


def test_write_all_draws_the_scores_and_the_setting(tmp_path):
    favour_v = table({f"{k}.{n}": (1.0 if k == "V" else -0.5) for k in KINDS for n in range(3)})
    favour_q = table({f"{k}.{n}": (1.0 if k == "Q" else -0.5) for k in KINDS for n in range(3)})
    a = write_all(favour_v, select(favour_v, 2), tmp_path / "v")
    b = write_all(favour_q, select(favour_q, 2), tmp_path / "q")
    assert [p.name for p in a] == ["scores_heatmap.png", "setting_heatmap.png", "kinds_distribution.png"]
    for pa, pb in zip(a, b, strict=True):
        assert pa.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        pixels_a, pixels_b = image.imread(pa), image.imread(pb)
        assert pixels_a.shape == pixels_b.shape and not np.array_equal(pixels_a, pixels_b), pa.name
