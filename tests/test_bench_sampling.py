"""The sampling benchmark runs end to end and prints its table (smallest settings)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_sampling_prints_a_row(capsys):
    spec = importlib.util.spec_from_file_location("bench_sampling", ROOT / "benchmarks" / "bench_sampling.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--size", "32", "--batch", "1", "--train-batch", "1", "--steps", "1",
                     "--repeats", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    row = [line for line in out.splitlines() if line.startswith("| tiny |")]
    assert len(row) == 1
    values = [float(v) for v in row[0].strip("|").split("|")[1:]]
    assert all(v > 0 for v in values)
