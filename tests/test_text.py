"""Tests of prompts, the built-in prompt encoder and the open_clip text encoder."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from nucsynth.layout import CONSEP_CLASSES, PANNUKE_CLASSES, Layout
from nucsynth.nets import BuiltinPromptEncoder, OpenClipTextEncoder, prompt_from_layout
from nucsynth.nets.text import PROMPT_TEMPLATE, format_prompt, parse_prompt, plip_to_open_clip, resolve_weights_path


def _layout(classes: list[int]) -> Layout:
    cen = [[4 + 6 * i, 5 + 3 * i] for i in range(len(classes))]
    return Layout.from_points((64, 64), cen, classes, CONSEP_CLASSES)


def test_prompt_from_layout() -> None:
    p = prompt_from_layout(_layout([3, 1, 3, 0]), tissue="colon")
    assert p == "high-quality histopathology colon tissue image including nuclei types of other and epithelial"
    assert prompt_from_layout(_layout([4, 2, 1, 3]), "breast").endswith("other and inflammatory and epithelial and spindle")
    assert prompt_from_layout(_layout([])).endswith("nuclei types of none")


def test_parse_roundtrip_and_errors() -> None:
    for ids in ([], [1], [2, 4], [1, 2, 3, 4]):
        p = format_prompt("head and neck", ids, CONSEP_CLASSES)
        assert parse_prompt(p, CONSEP_CLASSES) == ("head and neck", frozenset(ids))
    assert parse_prompt(
        "High-quality histopathology Colon tissue image including nuclei types of other, epithelial and spindle.",
        CONSEP_CLASSES,
    ) == ("colon", frozenset({1, 3, 4}))
    with pytest.raises(ValueError, match="does not follow the template") as e:
        parse_prompt("a photo of nuclei", CONSEP_CLASSES)
    assert PROMPT_TEMPLATE in str(e.value)
    with pytest.raises(ValueError, match="known types"):
        parse_prompt(format_prompt("colon", [1], PANNUKE_CLASSES), CONSEP_CLASSES)
    with pytest.raises(ValueError, match="outside the class set"):
        format_prompt("colon", [7], CONSEP_CLASSES)


def test_builtin_encoder_separates_one_class() -> None:
    torch.manual_seed(0)
    enc = BuiltinPromptEncoder(CONSEP_CLASSES, dim=32)
    prompts = [
        format_prompt("colon", [2, 3], CONSEP_CLASSES),
        format_prompt("colon", [1, 2, 3], CONSEP_CLASSES),  # differs in one class
        format_prompt("breast", [2, 3], CONSEP_CLASSES),  # differs in tissue
        format_prompt("colon", [2, 3], CONSEP_CLASSES),
    ]
    z = enc(prompts)
    assert z.shape == (4, 32)
    assert not torch.allclose(z[0], z[1]) and not torch.allclose(z[0], z[2])
    assert torch.equal(z[0], z[3])
    torch.testing.assert_close(enc.encode_sets(["colon", "colon"], [{2, 3}, {1, 2, 3}]), z[:2])
    z.square().sum().backward()
    assert enc.proj.weight.grad.abs().sum() > 0  # trained with the model


def test_builtin_encoder_errors_and_config() -> None:
    enc = BuiltinPromptEncoder(CONSEP_CLASSES, tissues=("colon", "breast"), dim=8)
    with pytest.raises(ValueError, match="template"):
        enc(["colon tissue with other nuclei"])
    with pytest.raises(ValueError, match="unknown tissue"):
        enc([format_prompt("liver", [1], CONSEP_CLASSES)])
    with pytest.raises(ValueError, match="outside 1..4"):
        enc.encode_sets(["colon"], [{5}])
    clone = BuiltinPromptEncoder.from_dict(enc.to_dict())
    clone.load_state_dict(enc.state_dict())
    p = [format_prompt("breast", [1, 4], CONSEP_CLASSES)]
    assert torch.equal(clone(p), enc(p))


def test_openclip_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "plip"
    with pytest.raises(FileNotFoundError, match="--text-encoder") as e:
        OpenClipTextEncoder(missing)
    assert str(missing) in str(e.value)
    missing.mkdir()
    with pytest.raises(FileNotFoundError, match="no single weights file"):
        OpenClipTextEncoder(missing)


def test_weights_path_from_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="models--vinid--plip"):
        resolve_weights_path("vinid/plip")
    snap = tmp_path / "hub" / "models--vinid--plip" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    assert resolve_weights_path("vinid/plip") == snap
    assert resolve_weights_path(str(snap)) == snap


@pytest.fixture(scope="module")
def clip_model():
    # find_spec, not importorskip: importing open_clip directly would trip the torchvision
    # CUDA-wheel problem that _import_open_clip works around.
    if importlib.util.find_spec("open_clip") is None:
        pytest.skip("open_clip_torch (the clip extra) is not installed")
    from nucsynth.nets.text import _import_open_clip

    open_clip = _import_open_clip()
    torch.manual_seed(0)
    return open_clip, open_clip.create_model("ViT-B-32-quickgelu", pretrained=None).eval()


def test_openclip_loads_checkpoint(tmp_path: Path, clip_model) -> None:
    open_clip, model = clip_model
    folder = tmp_path / "quiltnet"
    folder.mkdir()
    # A real QuiltNet file also holds the image tower ("visual.*", ignored) and may carry a
    # DDP "module." prefix; keep a few visual keys rather than writing all 350 MB.
    sd = {f"module.{k}": v for k, v in model.state_dict().items() if not k.startswith("visual.transformer")}
    torch.save(sd, folder / "open_clip_pytorch_model.bin")
    enc = OpenClipTextEncoder(folder)
    prompts = [format_prompt("colon", [1, 3], CONSEP_CLASSES), format_prompt("colon", [3], CONSEP_CLASSES)]
    feats = enc(prompts)
    with torch.no_grad():
        ref = model.encode_text(open_clip.get_tokenizer("ViT-B-32-quickgelu")(prompts), normalize=True)
    assert feats.shape == (2, 512) and enc.dim == 512
    torch.testing.assert_close(feats, ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(feats.norm(dim=1).numpy(), 1.0, atol=1e-5)
    assert not torch.allclose(feats[0], feats[1])
    torch.testing.assert_close(enc(prompts[::-1]), feats.flip(0))  # cached path


def test_openclip_rejects_foreign_weights(tmp_path: Path, clip_model) -> None:
    from safetensors.torch import save_file

    f = tmp_path / "other.safetensors"
    save_file({"foo.weight": torch.zeros(2, 2)}, str(f))
    with pytest.raises(ValueError, match="no CLIP text tower"):
        OpenClipTextEncoder(f)
    _, model = clip_model
    partial = tmp_path / "partial.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if ".resblocks.11." not in k}, str(partial))
    with pytest.raises(ValueError, match="missing keys"):
        OpenClipTextEncoder(partial)
    bad = tmp_path / "broken.bin"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        OpenClipTextEncoder(bad)


def test_plip_mapping_against_transformers(tmp_path: Path, clip_model) -> None:
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    open_clip, _ = clip_model
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_attention_heads=8,
                         num_hidden_layers=12, max_position_embeddings=77, hidden_act="quick_gelu",
                         eos_token_id=49407, bos_token_id=49406, pad_token_id=0),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=1,
                           image_size=224, patch_size=32, hidden_act="quick_gelu"),
        projection_dim=512,
    )
    torch.manual_seed(1)
    hf = transformers.CLIPModel(cfg).eval()
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    enc = OpenClipTextEncoder(tmp_path)
    prompts = [format_prompt("colon", [2], CONSEP_CLASSES), format_prompt("lung", [1, 4], CONSEP_CLASSES)]
    tokens = open_clip.get_tokenizer("ViT-B-32-quickgelu")(prompts)
    with torch.no_grad():
        ref = hf.get_text_features(input_ids=tokens, attention_mask=(tokens != 0).long())
        ref = getattr(ref, "text_embeds", getattr(ref, "pooler_output", ref))
    torch.testing.assert_close(enc(prompts), torch.nn.functional.normalize(ref, dim=-1), atol=1e-4, rtol=1e-4)
    assert set(plip_to_open_clip(hf.state_dict())) >= {"text_projection", "token_embedding.weight"}
