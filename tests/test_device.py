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
