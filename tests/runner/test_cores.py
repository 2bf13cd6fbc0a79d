"""Lanes on a CPU: one per core the process may use, a cgroup CPU limit included."""

import os

from consensusfit.runner.contract import CPU_LANES
from consensusfit.runner.inference import cores
from consensusfit.runner.local.pipeline import shard_environment


def test_a_cgroup_quota_caps_the_cores(tmp_path, monkeypatch):
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("max 100000\n")
    assert cores.cgroup_quota(cpu_max) is None
    cpu_max.write_text("150000 100000\n")
    assert cores.cgroup_quota(cpu_max) == 1.5
    assert cores.cgroup_quota(tmp_path / "absent") is None
    monkeypatch.setattr(cores, "cgroup_quota", lambda: 1.5)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert cores.available_cores() == 2  # a limit of 1.5 cores still runs 2 threads part time
    monkeypatch.setattr(cores, "cgroup_quota", lambda: None)
    assert cores.available_cores() == 8


def test_the_environment_overrides_and_the_pipeline_shares_out_the_cores(monkeypatch):
    monkeypatch.setattr(cores, "available_cores", lambda: 8)
    monkeypatch.delenv(CPU_LANES, raising=False)
    assert cores.cpu_lanes() == 8
    monkeypatch.setenv(CPU_LANES, "3")
    assert cores.cpu_lanes() == 3
    assert shard_environment(4)[CPU_LANES] == "2"
    assert shard_environment(16)[CPU_LANES] == "1"
