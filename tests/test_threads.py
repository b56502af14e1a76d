"""torch's team is sized from the CPUs the process may use: affinity and cgroup quota, flags and variables first."""

from __future__ import annotations

import os

import pytest
from helpers import fail

from fanlora import dist as threads
from fanlora.errors import UserError


def test_a_cgroup_v2_quota_caps_the_team(tmp_path, monkeypatch):
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs
    assert threads.cgroup_quota(tmp_path) == 1.5
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert threads.available_cpus(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads.cgroup_quota(tmp_path) is None and threads.available_cpus(tmp_path) == 4


def test_a_cgroup_v1_quota_and_the_affinity_mask(tmp_path, monkeypatch):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert threads.cgroup_quota(tmp_path) == 3.0 and threads.available_cpus(tmp_path) == 2  # the mask is smaller
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # no quota
    assert threads.cgroup_quota(tmp_path) is None


def test_flag_then_variables_then_the_machine(monkeypatch):
    monkeypatch.delenv("FANLORA_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.choose_threads() == 3 and threads.choose_threads(5) == 5
    monkeypatch.setenv("FANLORA_THREADS", "2")
    assert threads.choose_threads() == 2
    monkeypatch.setenv("FANLORA_THREADS", "two")
    with pytest.raises(UserError, match="FANLORA_THREADS='two'"):
        threads.choose_threads()
    with pytest.raises(UserError, match="--threads 0"):
        threads.choose_threads(0)
    monkeypatch.delenv("FANLORA_THREADS")
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(threads, "SERVE_THREADS", 1)
    assert threads.choose_threads(serve=True) == 1 and threads.choose_threads() == threads.available_cpus()


def test_serve_refuses_a_bad_thread_count_with_one_line(tmp_path, capsys):
    err = fail(capsys, ["serve", "--setting", str(tmp_path / "none.json"), "--threads", "0"])
    assert "--threads 0 must be ≥ 1" in err


def test_the_adaptive_team_follows_the_cpus_the_others_leave(tmp_path):
    """serve --threads auto: two threads on an idle 2-CPU machine, one beside a neighbour, two again after it."""
    from fanlora.serving import team as team_module

    clock, busy, own, sizes = [0.0], [0.0], [0.0], []

    def second(others: float, ours: float) -> None:  # one second passes: CPU-seconds used by others and by us
        clock[0] += 1.0
        busy[0] += others + ours
        own[0] += ours

    team = team_module.AdaptiveTeam(2, busy=lambda: busy[0], own=lambda: own[0], clock=lambda: clock[0],
                                    resize=sizes.append, cpus=2)  # fmt: skip
    second(0.0, 1.0)
    assert team.tick() == 2 and sizes == [2]  # idle machine: the second CPU is free
    clock[0] += 0.5
    assert team.tick() == 2 and sizes == [2]  # within a period: no look, no resize
    second(0.9, 1.1)  # a neighbour takes most of a CPU
    assert team.tick() == 1 and sizes == [2, 1]
    second(1.0, 1.0)
    assert team.tick() == 1 and sizes == [2, 1]
    second(0.0, 1.0)  # it left
    assert team.tick() == 2 and sizes == [2, 1, 2] and team.resizes == 3
    blind = team_module.AdaptiveTeam(4, busy=lambda: None, resize=sizes.append, cpus=4)  # not Linux: stays
    blind.last = (blind.last[0] - 2, None, blind.last[2])
    assert blind.tick() == 1 and sizes == [2, 1, 2]
    stat = tmp_path / "stat"
    stat.write_text("cpu  9 9 9 9 9 9 9 9 0 0\ncpu0 100 0 50 1000 10 0 0 0 0 0\ncpu1 7 0 0 5 0 0 0 0 0 0\nintr 1\n")
    assert team_module.busy_seconds({0}, stat) == 150 / team_module.TICKS  # user + system, not idle or iowait
    assert team_module.busy_seconds({0, 1}, stat) == 157 / team_module.TICKS
