"""`fanlora bench` end to end on the tiny model (what it reports, not how fast: no test times anything)."""

from __future__ import annotations

import math

import pytest
from helpers import setting_for

from fanlora.backbone import load_backbone


@pytest.mark.e2e
def test_bench_runs_every_configuration_and_prints_the_result_line(tmp_path, tiny_llama, capsys):
    from fanlora.cli import main

    backbone = load_backbone(str(tiny_llama))
    setting_for(backbone).write(tmp_path / "setting.json")
    out = tmp_path / "bench.txt"
    argv = [
        "bench",
        "--setting",
        str(tmp_path / "setting.json"),
        "--backbone",
        str(tiny_llama),
        "--rounds",
        "1",
        "--prompt-tokens",
        "12",
        "--new-tokens",
        "2",
        "--tenants",
        "3",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    report = out.read_text()
    for name in (
        "base",
        "fanlora (engine)",
        "fanlora (PEFT)",
        "lora all (PEFT)",
        "adalora (PEFT)",
        "ia3 (PEFT)",
        "engine, 3 distinct adapters",
        "PEFT adapter_names, 3 distinct",
    ):
        assert f"| {name} |" in report
    last = report.strip().splitlines()[-1].split()
    assert last[0] == "RESULT"
    result = dict(kv.split("=") for kv in last[1:])
    keys = ["fanlora_vs_base", "fanlora_vs_adalora", "fanlora_vs_base_beam3", "latency_measured", "mixed_vs_single"]
    keys.append("mixed_vs_peft")
    assert list(result) == keys
    assert all(math.isfinite(float(v)) and (float(v) > 0 or k == "latency_measured") for k, v in result.items())
    rows = [line for line in report.splitlines() if line.startswith("| ") and "---" not in line]
    cells = [r.split("|") for r in rows if r.split("|")[2].strip() in ("1", "3")]
    speeds = [float(c[4]) for c in cells]
    assert len(speeds) == 12 and all(v > 0 for v in speeds)  # six configurations × beam 1 and 3
    params = {c[1].strip(): int(c[3].replace(",", "")) for c in cells}
    assert params["base"] == 0 and params["ia3 (PEFT)"] < params["fanlora (PEFT)"] < params["lora all (PEFT)"]
