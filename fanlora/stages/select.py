"""Stage c: the setting — at most K_max modules per layer, never a negative score — or, with a budget, the
modules that maximise the summed score within it (:mod:`fanlora.stages.budget`); plus its figures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fanlora.atomic import file_sha256
from fanlora.config import R1
from fanlora.dist import say
from fanlora.errors import UserError
from fanlora.scoring.table import ScoreTable
from fanlora.setting import Setting
from fanlora.stages import plots
from fanlora.stages.selection import select


def run_select(
    scores_path: str | Path,
    k_max: int,
    setting_path: str | Path,
    plots_dir: str | Path | None = None,
    backbone: dict[str, Any] | None = None,
    budget: str | None = None,
    r1: int = R1,
    profile: str | None = None,
    engine: str = "fanlora",
) -> Setting:
    """Stage c: top-k_max non-negative modules per layer → setting.json (+ figures).

    ``backbone`` (an identity) is the backbone the setting is meant for; scores of any other are refused.
    With ``budget`` (``params=N`` or ``latency=P%``) the modules are chosen by :mod:`fanlora.stages.budget` instead,
    ``k_max`` then being an optional per-layer cap (None: no cap); ``engine="vllm"`` costs a latency budget as
    stock vLLM charges it (per packed projection kind in every layer) instead of per module.
    """
    table = ScoreTable.read(scores_path)
    theirs = table.backbone.get("weights_digest")
    if backbone is not None and theirs != backbone.get("weights_digest"):
        raise UserError(
            f"{scores_path} scores backbone {table.backbone.get('source')} (weights {theirs}), not "
            f"{backbone.get('source')} (weights {backbone.get('weights_digest')}): score this backbone first"
        )
    source = {
        "scores": str(scores_path),
        "scores_sha256_16": file_sha256(scores_path)[:16],
        "method": table.method,
        "metric": table.metric,
    }
    if budget is None:
        setting = select(table, 2 if k_max is None else k_max, source)
        how = f"K_max={setting.k_max}"
    else:
        from fanlora.stages.budget import budget_setting, parse_budget

        setting = budget_setting(table, budget, k_max, r1, profile, source, engine)
        b = setting.source["budget"]
        cap = "no per-layer cap" if k_max is None else f"at most {k_max} per layer"
        how = f"budget {b['text']}, {cap}; predicted cost {parse_budget(budget).describe(b['predicted_cost'])}"
        if engine == "vllm":
            how += f" on stock vLLM: --lora-target-modules {' '.join(setting.source['vllm_lora_target_modules'])}"
    setting.write(setting_path)
    if plots_dir is not None:
        plots.write_all(table, setting, plots_dir)
    say(f"stage c: {setting.n_modules} modules kept ({how}) → {setting_path}")
    return setting
