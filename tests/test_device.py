import pytest

from nucsynth.device import describe_device, pick_device


def test_pick_default_and_cpu():
    import torch

    dev = pick_device(None)
    assert dev.type in {"cpu", "cuda", "mps"}
    assert pick_device("cpu") == torch.device("cpu")
    assert describe_device(torch.device("cpu")).startswith("CPU")


def test_bad_device_names_are_explained():
    import torch

    with pytest.raises(ValueError, match="unknown device"):
        pick_device("quantum")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            pick_device("cuda")


def test_cgroup_memory_room_v1_and_v2(tmp_path):
    from pathlib import Path

    from nucsynth.device import _cgroup_memory_room

    def write(path: Path, text: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    write(tmp_path / "job" / "memory.max", "1000000")
    write(tmp_path / "job" / "memory.current", "250000")
    write(tmp_path / "proc", "0::/job\n")
    assert _cgroup_memory_room(tmp_path, tmp_path / "proc") == 750000
    write(tmp_path / "job" / "memory.max", "max")
    assert _cgroup_memory_room(tmp_path, tmp_path / "proc") is None
    write(tmp_path / "memory" / "box" / "memory.limit_in_bytes", "9223372036854771712")  # v1: no limit
    write(tmp_path / "memory" / "box" / "memory.usage_in_bytes", "5")
    write(tmp_path / "proc", "4:memory:/box\n")
    assert _cgroup_memory_room(tmp_path, tmp_path / "proc") is None
    write(tmp_path / "memory" / "box" / "memory.limit_in_bytes", "4096")
    assert _cgroup_memory_room(tmp_path, tmp_path / "proc") == 4091


def test_feature_cache_budget_is_a_share_of_free_memory():
    import torch

    from nucsynth.device import available_memory, feature_cache_budget

    free = available_memory(torch.device("cpu"))
    budget = feature_cache_budget(torch.device("cpu"))
    assert budget > 0
    if free is not None:
        assert budget <= free
