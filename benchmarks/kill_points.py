"""kill -9 at chosen points inside store appends, checkpoint writes and ``--overwrite``
replacements, and check that nothing is lost.

    python benchmarks/kill_points.py [--store 20] [--checkpoint 10] [--overwrite 5] [--workdir DIR]

Each trial runs the operation in a child process that counts the file-system changes it
makes (Python audit events: opening a file for writing, rename / replace, remove, mkdir,
rmdir, link, chmod, plus one marked just before the ``renameat2`` exchange) and sends itself SIGKILL just
before the k-th one. The points are spread evenly over the operation, whose length is
counted first in a run that is not killed. After every kill the parent checks:

- store append (half of the points in a store's FIRST append, half in a later one): the
  store reopens with the old rows or the old + new rows, every row equal to what was
  written, ``check()`` finds no damage, and a further append works (the writer lock went
  away with the killed process);
- checkpoint write (inside the second of two checkpoints of a tiny training run):
  ``train(resume=True)`` continues from the newest intact checkpoint to the end, its final
  weights equal those of an uninterrupted run bit for bit, no temporary folder remains;
- ``--overwrite`` replacement of a store (with the one-step exchange, and with the
  two-rename fallback used where the system has no exchange): after the next run's tidy-up
  (what ``check_output`` does) the path holds the complete old or the complete new store.

Prints one line per trial and a summary; exits 1 if any trial lost data.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

_ACTIVE = [False]
_COUNT = [0]
_WRITE_EVENTS = {"os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.link", "os.chmod", "os.truncate",
                 "os.symlink", "kill_points.exchange"}


# ---------------------------------------------------------------------- the child side
def _install_killer(kill_at: int) -> None:
    """Count file-system changes while _ACTIVE; SIGKILL this process before change ``kill_at``."""
    lock = threading.Lock()
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def hook(event: str, args: tuple) -> None:
        if not _ACTIVE[0]:
            return
        if event == "open":
            mode, flags = args[1], args[2]
            if not ((isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & write_flags):
                return
        elif event not in _WRITE_EVENTS:
            return
        with lock:
            _COUNT[0] += 1
            if _COUNT[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(hook)


def _counted(fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*a: Any, **k: Any) -> Any:
        _ACTIVE[0] = True
        try:
            return fn(*a, **k)
        finally:
            _ACTIVE[0] = False

    return wrapper


def samples(n: int, seed: int, size: int = 32) -> list:
    """``n`` deterministic Samples: random tissue-coloured noise and 1-4 disc nuclei each."""
    from nucsynth.layout import CONSEP_CLASSES, Layout, Sample

    rng = np.random.default_rng(seed)
    out = []
    yy, xx = np.indices((size, size))
    for i in range(n):
        inst = np.zeros((size, size), np.int32)
        k = 1 + i % 4
        for j in range(k):
            cy, cx = rng.integers(6, size - 6, 2)
            inst[((yy - cy) ** 2 + (xx - cx) ** 2 <= 16) & (inst == 0)] = j + 1
        ids = np.unique(inst[inst > 0])  # a disc hidden under earlier ones has no pixels: relabel 1..N
        inst = (np.searchsorted(ids, inst) + 1).astype(np.int32) * (inst > 0)
        lay = Layout.from_inst_map(inst, rng.integers(1, 5, len(ids)), CONSEP_CLASSES)
        img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        out.append(Sample(lay, img, {"source": f"seed{seed}", "index": i}))
    return out


def _child_store(d: Path) -> None:
    import nucsynth.io.store as store_mod
    from nucsynth.io.store import DatasetStore

    store_mod._WRITE_BYTES = 3 * 32 * 32 * 7  # flush about every 2 samples: several writes before the commit
    st = DatasetStore.open(d / "s.zarr", mode="a")
    _counted(st.append)(samples(6, seed=1), splits="new")


def _tiny_training(run: Path, steps: int) -> Any:
    import torch

    from nucsynth.data.dataset import SampleDataset
    from nucsynth.models.base import get_family
    from nucsynth.layout import CONSEP_CLASSES
    from nucsynth.train import TrainConfig, train

    torch.set_num_threads(1)
    model = get_family("semantic").from_preset("tiny", 32, CONSEP_CLASSES)
    data = SampleDataset(samples(4, seed=3), maps=model.data_maps, size=32, augment=False, seed=0)
    cfg = TrainConfig(steps=steps, batch_size=2, warmup=0, checkpoint_every=1, keep_checkpoints=1,
                      preview_at_end=False, seed=0, device="cpu")
    return lambda resume: train(model, data, run, cfg, resume=resume)


def _child_checkpoint(d: Path) -> None:
    import nucsynth.train as train_mod

    original = train_mod._checkpoint

    def checkpoint(out: Path, *a: Any, **k: Any) -> Any:
        step = a[7] if len(a) > 7 else k["step"]
        return (_counted(original) if step == 2 else original)(out, *a, **k)

    train_mod._checkpoint = checkpoint
    _tiny_training(d / "run", steps=2)(False)


def _child_overwrite(d: Path, exchange: bool) -> None:
    from nucsynth import outputs
    from nucsynth.io.store import DatasetStore
    from nucsynth.layout import CONSEP_CLASSES

    if not exchange:
        outputs._exchange = lambda a, b: False  # the two-rename fallback of systems without exchange
    else:  # ctypes calls raise no audit event: mark the exchange as one change of its own
        swap = outputs._exchange
        outputs._exchange = lambda a, b: (sys.audit("kill_points.exchange"), swap(a, b))[1]
    replace, counted = outputs.replace_path, _counted(outputs.replace_path)
    # count only the replacement of the output itself, not the store's own creation rename
    outputs.replace_path = lambda tmp, path, overwrite: (counted if Path(path).name == "out.zarr" else replace)(
        tmp, path, overwrite)
    with outputs.staged(d / "out.zarr", overwrite=True) as tmp:
        st = DatasetStore.create(tmp, CONSEP_CLASSES)
        st.append(samples(4, seed=11))
        st.close()


def _child(scenario: str, kill_at: int, d: Path) -> None:
    _install_killer(kill_at)
    if scenario == "store":
        _child_store(d)
    elif scenario == "checkpoint":
        _child_checkpoint(d)
    else:
        _child_overwrite(d, exchange=scenario == "overwrite-exchange")
    print(f"EVENTS {_COUNT[0]}")


# ---------------------------------------------------------------------- the parent side
def _run_child(scenario: str, kill_at: int, d: Path) -> tuple[int, int | None]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, __file__, "--child", scenario, "--kill-at", str(kill_at), "--dir", str(d)],
                       capture_output=True, text=True, env=env, timeout=600)
    events = next((int(line.split()[1]) for line in p.stdout.splitlines() if line.startswith("EVENTS ")), None)
    if p.returncode not in (0, -signal.SIGKILL):
        raise RuntimeError(f"child {scenario} k={kill_at} failed ({p.returncode}): {p.stderr[-2000:]}")
    return p.returncode, events


def _same(a: Any, b: Any) -> bool:
    return (np.array_equal(a.image, b.image) and np.array_equal(a.layout.inst_map, b.layout.inst_map)
            and np.array_equal(a.layout.classes, b.layout.classes) and np.array_equal(a.layout.centroids, b.layout.centroids))


def _setup_store(d: Path, pre: int) -> list:
    from nucsynth.io.store import DatasetStore
    from nucsynth.layout import CONSEP_CLASSES

    old = samples(pre, seed=0)
    with DatasetStore.create(d / "s.zarr", CONSEP_CLASSES) as st:
        if pre:
            st.append(old, splits="old")
    return old


def _verify_store(d: Path, old: list) -> str:
    from nucsynth.io.store import DatasetStore

    new = samples(6, seed=1)
    st = DatasetStore.open(d / "s.zarr")
    n = len(st)
    if n not in (len(old), len(old) + len(new)):
        return f"FAIL: {n} rows after the kill (expected {len(old)} or {len(old) + len(new)})"
    want = (old + new)[:n]
    if not all(_same(a, b) for a, b in zip(want, st)):
        return "FAIL: a committed row differs from what was written"
    rep = st.check()
    if not rep.ok:
        return "FAIL: check() found damage: " + "; ".join(rep.lines()[1:])
    more = samples(2, seed=2)
    with DatasetStore.open(d / "s.zarr", mode="a") as w:  # the killed writer's lock is gone
        w.append(more, splits="more")
    st = DatasetStore.open(d / "s.zarr")
    if len(st) != n + 2 or not all(_same(a, b) for a, b in zip(want + more, st)) or not st.check().ok:
        return "FAIL: the next append after the kill went wrong"
    return f"ok: reopened with {n} rows ({'new rows committed' if n > len(old) else 'old rows only'}), next append fine"


def _verify_checkpoint(d: Path, reference: dict) -> str:
    import torch
    from safetensors.torch import load_file

    from nucsynth.checkpoint import list_checkpoints

    result = _tiny_training(d / "run", steps=3)(True)
    left = [p.name for p in (d / "run" / "checkpoints").iterdir() if p.name.startswith(".")]
    final = load_file(str(list_checkpoints(d / "run")[-1] / "ema.safetensors"))
    if result.step != 3:
        return f"FAIL: resumed run ended at step {result.step}"
    if left:
        return f"FAIL: temporary folders remain: {left}"
    if set(final) != set(reference) or not all(torch.equal(final[k], reference[k]) for k in final):
        return "FAIL: resumed weights differ from an uninterrupted run"
    skipped = f", skipped {[p.name for p, _ in result.skipped]}" if result.skipped else ""
    return f"ok: resumed from {result.resumed_from.name}{skipped}, final weights equal the uninterrupted run's"


def _verify_overwrite(d: Path, old: list) -> str:
    from nucsynth import outputs
    from nucsynth.io.store import DatasetStore

    lines = outputs.tidy(d / "out.zarr", report=None)  # what the next run on the same output does
    new = samples(4, seed=11)
    if not (d / "out.zarr").exists():
        return "FAIL: nothing at the output path"
    st = DatasetStore.open(d / "out.zarr")
    got = list(st)
    which = "old" if len(got) == len(old) and all(map(_same, old, got)) else \
        "new" if len(got) == len(new) and all(map(_same, new, got)) else None
    if which is None or not st.check().ok:
        return f"FAIL: the output holds neither the complete old nor the complete new store ({len(got)} rows)"
    rest = [p.name for p in d.iterdir() if p.name.startswith(".")]
    if rest:
        return f"FAIL: leftovers remain after tidy: {rest}"
    return f"ok: output holds the {which} store" + (f" ({lines[0].split(',')[0]})" if lines else "")


def _points(total: int, n: int) -> list[int]:
    return sorted({int(round(x)) for x in np.linspace(1, total, n)}) if n > 0 else []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", type=int, default=20, help="kill points inside store appends (default 20)")
    ap.add_argument("--checkpoint", type=int, default=10, help="kill points inside checkpoint writes (default 10)")
    ap.add_argument("--overwrite", type=int, default=5, help="kill points inside --overwrite replacements (default 5)")
    ap.add_argument("--workdir", type=Path, default=None, help="where trials run (default: a temporary folder)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--kill-at", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(args.child, args.kill_at, args.dir)
        return 0
    import torch

    torch.set_num_threads(1)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="kill_points-"))
    root.mkdir(parents=True, exist_ok=True)
    results: list[tuple[str, str]] = []
    t0 = time.perf_counter()

    def fresh(name: str) -> Path:
        d = root / name
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        return d

    def trial(label: str, scenario: str, k: int, setup: Callable[[Path], Any], verify: Callable[[Path, Any], str]) -> None:
        d = fresh("trial")
        ctx = setup(d)
        rc, _ = _run_child(scenario, k, d)
        msg = verify(d, ctx) if rc == -signal.SIGKILL else "FAIL: the child was not killed"
        results.append((label, msg))
        print(f"{label:<34} {msg}", flush=True)

    # store appends: half in the first append of an empty store, half in a later one
    for pre, n in ((0, args.store // 2), (5, args.store - args.store // 2)):
        if n == 0:
            continue
        d = fresh("count")
        _setup_store(d, pre)
        _, total = _run_child("store", 0, d)
        for k in _points(total, n):
            trial(f"store append (pre={pre}) {k}/{total}", "store", k, lambda d, pre=pre: _setup_store(d, pre), _verify_store)

    if args.checkpoint:
        d = fresh("reference")
        result = _tiny_training(d / "run", steps=3)(False)
        from safetensors.torch import load_file

        reference = load_file(str(result.checkpoint / "ema.safetensors"))
        d = fresh("count")
        _, total = _run_child("checkpoint", 0, d)
        for k in _points(total, args.checkpoint):
            trial(f"checkpoint write {k}/{total}", "checkpoint", k, lambda d: reference, _verify_checkpoint)

    def setup_out(d: Path) -> list:
        from nucsynth.io.store import DatasetStore
        from nucsynth.layout import CONSEP_CLASSES

        old = samples(3, seed=10)
        with DatasetStore.create(d / "out.zarr", CONSEP_CLASSES) as st:
            st.append(old)
        return old

    n_exchange = args.overwrite // 2
    for scenario, n in (("overwrite-exchange", n_exchange), ("overwrite-renames", args.overwrite - n_exchange)):
        if n == 0:
            continue
        d = fresh("count")
        setup_out(d)
        _, total = _run_child(scenario, 0, d)
        # the first points matter most (before, between and just after the renames)
        for k in list(range(1, min(n, total) + 1)):
            trial(f"{scenario} {k}/{total}", scenario, k, setup_out, _verify_overwrite)

    failed = [r for r in results if not r[1].startswith("ok")]
    print(json.dumps({"trials": len(results), "failed": len(failed), "seconds": round(time.perf_counter() - t0, 1)}))
    if args.workdir is None:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
