"""Does the label-aware decoder earn its place? One latent space, two decoders.

The shipped autoencoder's decoder takes the layout (SPADE). To measure what that buys, a
PLAIN decoder (no layout input, same widths) is trained on the SAME frozen encoder, so both
decoders read the same latent space. Then:

1. reconstruction of held-out `val` patches with each decoder (PSNR, SSIM, nucleus colour
   error, as benchmarks/bench_autoencoder.py);
2. the latent model renders each `val` layout ONCE (same seeds, so the same latents) and
   both decoders decode those latents; a segmenter trained on real tiles then gives the
   two realism figures of benchmarks/bench_realism.py for each decoder (feature distance
   to the real `val` images; PQ of the layout recovered from the rendering, relative to
   the PQ on real images).

    python benchmarks/ablate_label_aware.py --store runs/consep.zarr --checkpoint MODEL \
        [--decoder-steps 400] [--limit 16] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import nucsynth  # noqa: F401  first: the engine sets OpenMP's passive wait before torch loads (a spinning pool collapses on a busy CPU)

import argparse
import json
import time

import numpy as np


def train_plain_decoder(ae_net, source, steps: int, seed: int, batch: int = 8, crop: int = 64):
    """A decoder without layout input trained on ``ae_net``'s frozen encoder, on ``source``
    (the training split) (L1 + SSIM,
    the autoencoder family's loss without the KL term, which only concerns the encoder)."""
    import torch

    from nucsynth.data.dataset import SampleDataset
    from nucsynth.models.autoencoder import ssim
    from nucsynth.nets.autoencoder import AutoencoderConfig, KLAutoencoder

    cfg = AutoencoderConfig.from_dict({**ae_net.config.to_dict(), "cond_channels": 0})
    torch.manual_seed(seed)
    plain = KLAutoencoder(cfg)
    enc = {k: v for k, v in ae_net.state_dict().items() if k.startswith("enc_")}
    plain.load_state_dict(enc, strict=False)
    plain.requires_grad_(False)
    params = [p for n, p in plain.named_parameters() if n.startswith("dec_")]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=4e-4)
    ds = SampleDataset(source, maps=(), size=crop, seed=seed)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for step in range(steps):
        ds.set_epoch(step)
        idx = rng.choice(len(ds), batch, replace=False)
        x = torch.stack([ds[int(i)]["image"] for i in idx])
        with torch.no_grad():
            mean, _ = plain.encode(x)
        rec = plain.decode(mean)
        loss = (rec - x).abs().mean() + 0.5 * (1 - ssim(rec, x))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 50 == 0:
            print(f"plain decoder step {step + 1}/{steps} loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return plain.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True)
    p.add_argument("--checkpoint", default=None, help="latent model with a label-aware autoencoder (default: shipped)")
    p.add_argument("--segmenter", default=None)
    p.add_argument("--decoder-steps", type=int, default=400)
    p.add_argument("--limit", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    import torch

    from bench_autoencoder import reconstruction_figures
    from bench_realism import recovered, segmenter_encoder
    from nucsynth.checkpoint import load_checkpoint, resolve_checkpoint
    from nucsynth.data.dataset import image_to_tensor, split_source
    from nucsynth.evaluate.image_quality import segmenter_feature_distance
    from nucsynth.evaluate.segmenter import load_segmenter
    from nucsynth.io.store import DatasetStore
    from nucsynth.models.semantic import to_uint8

    torch.set_num_threads(args.threads)
    model, _ = load_checkpoint(resolve_checkpoint(args.checkpoint))
    if not model.is_latent or not model.config.latent["label_aware"]:
        raise SystemExit("the model must be a latent model with a label-aware autoencoder")
    aware = model.autoencoder("cpu")
    store = DatasetStore.open(args.store)
    train = split_source(store, store.indices("train"))
    plain = train_plain_decoder(aware, train, args.decoder_steps, args.seed)
    scale = model.config.latent["scale"]

    idx = store.indices("val")
    idx = idx[:: max(1, len(idx) // args.limit)][: args.limit]
    val = [store[int(i)] for i in idx]
    conds = [model.condition([s.layout]) for s in val]

    def decode(z: torch.Tensor, cond: torch.Tensor, which: str) -> np.ndarray:
        with torch.no_grad():
            x = aware.decode(z, cond) if which == "label-aware" else plain.decode(z)
        return to_uint8(x)[0]

    out: dict = {"patches": [int(i) for i in idx], "decoder_steps": args.decoder_steps, "decoders": {}}
    # 1. reconstruction
    recon: dict[str, dict[str, list]] = {k: {"psnr": [], "ssim": [], "colour": []} for k in ("label-aware", "plain")}
    for s, c in zip(val, conds):
        with torch.no_grad():
            z = aware.encode(image_to_tensor(s.image)[None])[0]
        for which in recon:
            for key, value in zip(("psnr", "ssim", "colour"), reconstruction_figures(s.image, decode(z, c, which),
                                                                                    s.layout.inst_map)):
                recon[which][key].append(value)
    # 2. rendering: the same latents through both decoders
    latents = [model._denoise(model.net, model.latent_condition(c), args.steps, args.guidance, int(i), "dpm++2m") / scale
               for c, i in zip(conds, idx)]
    seg, seg_classes, _ = load_segmenter(args.segmenter)
    encoder = segmenter_encoder(seg)
    real_images = [s.image for s in val]

    def pq_mean(images: list[np.ndarray]) -> float:
        return recovered(seg, seg_classes, val, images)["pq"]

    pq_real = pq_mean(real_images)
    out["pq_real"] = pq_real
    for which in recon:
        images = [decode(z, c, which) for z, c in zip(latents, conds)]
        fd = segmenter_feature_distance(real_images, images, encoder)
        rec_pq = pq_mean(images)
        r = recon[which]
        out["decoders"][which] = {
            "psnr_db": float(np.mean(r["psnr"])), "ssim": float(np.mean(r["ssim"])),
            "nucleus_colour_error": float(np.concatenate(r["colour"]).mean()),
            "feature_distance": fd, "pq_rendered": rec_pq, "recovery": rec_pq / pq_real,
        }
        d = out["decoders"][which]
        print(f"{which:12s} PSNR {d['psnr_db']:.2f} dB  SSIM {d['ssim']:.3f}  colour {d['nucleus_colour_error']:.2f}  "
              f"feature distance {fd:.4f}  recovery {d['recovery']:.2f} x real (PQ {rec_pq:.3f} vs {pq_real:.3f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
