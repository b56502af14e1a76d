"""The 2025–26 placement scorers (plop-nfn, grad-norm, lora-drop) against direct computations of their
definitions on a tiny random model, and `fanlora score` on a bare backbone for the two that need no stage a."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import fail, gated_model, run_study, study_for, val_set

from fanlora.backbone import load_backbone
from fanlora.cli import main
from fanlora.scoring import make_batches
from fanlora.scoring.probes import weight_out_in
from fanlora.scoring.study import BareModel


@pytest.fixture(scope="module")
def bare(tiny_llama_3layers):
    b = load_backbone(str(tiny_llama_3layers))
    model = BareModel(b.model, b.layout)
    return model, make_batches(val_set(), b.tokenizer.pad_token_id, 2)


def captured_inputs(model, layout, batches):
    """Every module's input rows at the non-padding tokens, per batch, by a plain forward hook."""
    seen: dict[str, list[torch.Tensor]] = {f"{k}.{n}": [] for k, n in layout.all_modules()}
    hooks = []
    for k, n in layout.all_modules():
        mod = model.get_submodule(layout.module_name(k, n))
        hooks.append(mod.register_forward_hook(lambda m, a, out, key=f"{k}.{n}": seen[key].append(a[0].detach())))
    with torch.no_grad():
        for b in batches:
            model(input_ids=b.input_ids, attention_mask=b.attention_mask)
    for h in hooks:
        h.remove()
    masks = [b.attention_mask.reshape(-1).bool() for b in batches]
    return {
        key: torch.cat([x.reshape(-1, x.shape[-1])[m] for x, m in zip(xs, masks, strict=True)])
        for key, xs in seen.items()
    }


def test_closed_form_denominator_is_the_expected_random_feature_norm():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(24, 16, generator=g), torch.randn(16, generator=g) * 3
    z = torch.randn(20000, 16, generator=g)
    z = z / z.norm(dim=1, keepdim=True) * x.norm()  # random directions, x's norm
    monte_carlo = (z @ w.t()).pow(2).sum(1).mean()
    assert float(monte_carlo) == pytest.approx(float(x.norm() ** 2 * w.norm() ** 2 / 16), rel=0.03)


def test_plop_nfn_is_the_mean_token_feature_norm_ratio_per_type(bare, tmp_path):
    model, batches = bare
    layout = model.layout
    table = run_study(study_for(model, batches, "plop-nfn"), model, batches, tmp_path)
    xs = captured_inputs(model.model, layout, batches)
    direct = {}
    for key, x in xs.items():
        w = weight_out_in(model.model.get_submodule(layout.module_name(*_split(key)))).detach().float()
        direct[key] = float(((x @ w.t()).norm(dim=1) / (x.norm(dim=1) * w.norm() / w.shape[1] ** 0.5)).mean())
    for key, v in direct.items():
        assert table.columns[key]["nfn"] == pytest.approx(v, rel=1e-5)
    for kind in layout.kinds:
        mean = sum(direct[f"{kind}.{n}"] for n in range(layout.num_layers)) / layout.num_layers
        assert all(table.score(kind, n) == pytest.approx(1 / mean, rel=1e-5) for n in range(layout.num_layers))


def test_grad_norm_is_the_weight_gradient_norm_over_rms_input(bare, tmp_path):
    model, batches = bare
    layout = model.layout
    study = study_for(model, batches, "grad-norm")
    flags = [p.requires_grad for p in model.model.parameters()]
    table = run_study(study, model, batches, tmp_path, world=2)  # rank 1 has no unit: the whole set is rank 0's
    assert flags == [p.requires_grad for p in model.model.parameters()]  # restored by the scorer
    weights = {f"{k}.{n}": model.model.get_submodule(layout.module_name(k, n)).weight for k, n in layout.all_modules()}
    for w in weights.values():
        w.requires_grad_(True)
        w.grad = None
    loss = sum(model.model(**_hf(b)).loss * b.n_scored for b in batches) / study.n_tokens
    loss.backward()
    xs = captured_inputs(model.model, layout, batches)
    for key, w in weights.items():
        expected = float(w.grad.norm()) / float((xs[key].pow(2).sum() / w.shape[1]) ** 0.5)
        assert table.values[key] == pytest.approx(expected, rel=1e-4)


def test_lora_drop_is_the_normalised_lora_output_energy(tiny_llama_3layers, tmp_path):
    gated, pad = gated_model(tiny_llama_3layers)
    batches = make_batches(val_set(), pad, 2)
    table = run_study(study_for(gated, batches, "lora-drop"), gated, batches, tmp_path)
    base = gated.model.get_base_model()
    xs = captured_inputs(base, gated.layout, batches)
    direct = {}
    with torch.no_grad():
        for key, x in xs.items():
            mod = base.get_submodule(gated.layout.module_name(*_split(key)))
            direct[key] = float((mod(x) - mod.base_layer(x)).pow(2).sum(1).mean())  # the LoRA branch, by difference
    total = sum(direct.values())
    for key, v in direct.items():
        assert table.values[key] == pytest.approx(v / total, rel=1e-4)
    assert sum(table.values.values()) == pytest.approx(1.0)


def test_bare_scorers_run_without_stage_a_and_record_their_cost(recipe_file, tmp_path, capsys):
    run = tmp_path / "bare"
    for method in ("plop-nfn", "grad-norm"):
        assert main(["score", "--config", str(recipe_file), "--run-dir", str(run), "--scorer", method]) == 0
        data = json.loads((run / f"scores-{method}.json").read_text())
        cost = data["cost"]
        assert cost["needs_stage_a"] is False and cost["cpu_seconds"] > 0 and cost["passes"] >= 1
        assert data["adapter"] is None
    assert not (run / "search").exists()
    out = tmp_path / "plop.json"
    assert main(["select", "--scores", str(run / "scores-plop-nfn.json"), "--out", str(out), "--no-plots"]) == 0
    kept = json.loads(out.read_text())["kept"]
    assert len({tuple(sorted(v)) for v in kept.values()}) == 1  # PLoP picks types: the same two in every layer
    err = fail(
        capsys, ["score", "--config", str(recipe_file), "--run-dir", str(tmp_path / "b2"), "--scorer", "lora-drop"]
    )
    assert "no stage-a adapter" in err


def _split(key: str) -> tuple[str, int]:
    kind, layer = key.split(".")
    return kind, int(layer)


def _hf(batch) -> dict:
    labels = batch.labels.clone()
    return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "labels": labels}
