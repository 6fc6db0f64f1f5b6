"""The engine's thread policy: cores from affinity and cgroup quota, the passive wait
policy reaching OpenMP, and one ``--threads`` on every command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nucsynth import threads
from nucsynth.cli import _leaf_parsers, build_parser, main


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota_smallest_of_group_and_ancestors(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    _write(root / "cgroup.controllers", "cpu memory")
    _write(root / "user.slice" / "cpu.max", "300000 100000")
    _write(root / "user.slice" / "job" / "cpu.max", "150000 100000")
    proc = tmp_path / "proc_cgroup"
    _write(proc, "0::/user.slice/job\n")
    assert threads.cgroup_cpu_limit(root, proc) == pytest.approx(1.5)
    _write(root / "user.slice" / "job" / "cpu.max", "max 100000")
    assert threads.cgroup_cpu_limit(root, proc) == pytest.approx(3.0)
    _write(root / "user.slice" / "cpu.max", "max 100000")
    assert threads.cgroup_cpu_limit(root, proc) is None


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    _write(root / "cpu" / "docker" / "abc" / "cpu.cfs_quota_us", "200000")
    _write(root / "cpu" / "docker" / "abc" / "cpu.cfs_period_us", "100000")
    _write(root / "cpu" / "cpu.cfs_quota_us", "-1")  # unlimited at the root
    _write(root / "cpu" / "cpu.cfs_period_us", "100000")
    proc = tmp_path / "proc_cgroup"
    _write(proc, "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n")
    assert threads.cgroup_cpu_limit(root, proc) == pytest.approx(2.0)


def test_no_cgroup_files_means_no_limit(tmp_path: Path) -> None:
    assert threads.cgroup_cpu_limit(tmp_path / "none", tmp_path / "missing") is None


def test_available_cpus_within_affinity_and_quota(monkeypatch: pytest.MonkeyPatch) -> None:
    affinity = len(os.sched_getaffinity(0))
    assert 1 <= threads.available_cpus() <= affinity
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda *a, **k: 0.5)
    assert threads.available_cpus() == 1
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda *a, **k: 1000.0)
    assert threads.available_cpus() == affinity
    assert threads.default_threads(workers=affinity + 3) == 1  # never below one thread
    with pytest.raises(ValueError, match="workers must be >= 0"):
        threads.default_threads(-1)


def test_set_threads_explicit_env_and_default(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    before = torch.get_num_threads()
    try:
        assert threads.set_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert threads.set_threads(None) == 2 and torch.get_num_threads() == 2
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(threads, "available_cpus", lambda: 4)
        assert threads.set_threads(None, workers=1) == 3  # the worker processes keep their cores
        for bad in (0, -2, 1.5, True):
            with pytest.raises(ValueError, match="threads must be a whole number >= 1"):
                threads.set_threads(bad)
    finally:
        torch.set_num_threads(before)


_IDLE_CPU = """
import sys, time
{first}
import torch
torch.set_num_threads(2)
x = torch.randn(384, 384)
for _ in range(30):
    x = torch.tanh(x @ x)
t0 = time.process_time()
time.sleep(0.3)
print(time.process_time() - t0)
"""


def _idle_cpu_seconds(first: str, policy: str | None) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run([sys.executable, "-c", _IDLE_CPU.format(first=first)], env=env, check=True,
                         capture_output=True, text=True, timeout=120)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(threads.available_cpus() < 2, reason="needs two cores to see OpenMP threads spin")
def test_passive_wait_policy_reaches_openmp() -> None:
    # Spinning OpenMP threads burn CPU while the main thread sleeps; importing nucsynth
    # before torch must stop that. ACTIVE shows the measurement can see spinning at all.
    active = _idle_cpu_seconds("", "ACTIVE")
    ours = _idle_cpu_seconds("import nucsynth", None)
    assert active > 0.05, f"could not observe spinning threads (ACTIVE used {active:.3f} s CPU asleep)"
    assert ours < 0.02, f"threads kept spinning after import nucsynth: {ours:.3f} s CPU while asleep"


def test_wait_policy_respects_the_user(monkeypatch: pytest.MonkeyPatch) -> None:
    code = "import nucsynth, os; from nucsynth.threads import wait_policy; print(os.environ['OMP_WAIT_POLICY'], wait_policy())"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["PASSIVE", "passive"]
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["ACTIVE", "active"]


def test_every_command_line_has_threads() -> None:
    parser = build_parser()
    commands = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"][0].choices
    leaves = [leaf for p in commands.values() for leaf in _leaf_parsers(p)]
    assert len(leaves) >= len(commands)
    for leaf in leaves:
        assert any("--threads" in a.option_strings for a in leaf._actions), leaf.prog


def test_cli_threads_applied_and_checked(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    before = torch.get_num_threads()
    try:
        code = main(["train", "--threads", "0", "--out", "unused"])  # bad input: one line, exit 2
        assert code == 2
        assert "--threads must be at least 1, got 0" in capsys.readouterr().err
        code = main(["train", "--threads", "1", "--out", "unused"])  # fails later: no --data
        assert code == 2 and torch.get_num_threads() == 1
        assert "--data is required" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)


@pytest.mark.usefixtures("one_torch_thread")
def test_threads_for_work_caps_small_work_and_restores_the_count() -> None:
    import torch

    torch.set_num_threads(2)
    with threads.threads_for_work(threads.SMALL_WORK_POSITIONS - 1) as n:
        assert n == torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with threads.threads_for_work(threads.SMALL_WORK_POSITIONS) as n:
        assert n == torch.get_num_threads() == 2
    with pytest.raises(RuntimeError), threads.threads_for_work(1):
        raise RuntimeError("a failed render")
    assert torch.get_num_threads() == 2
