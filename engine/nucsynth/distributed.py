"""Batch synthesis on a dask.distributed cluster: many workers render, one process writes.

:class:`DaskExecutor` is the executor of a :class:`nucsynth.synthesize.SynthesisJob`:

- ``DaskExecutor(workers=N)`` starts a local cluster of N worker processes (one per GPU or
  CPU slot; each renders one batch at a time), ``DaskExecutor(scheduler=ADDRESS)`` joins an
  existing cluster (``tcp://host:8786``, or the path of a scheduler file written by
  ``dask scheduler --scheduler-file``, dask-jobqueue on SLURM, or the dask Kubernetes
  operator; docs/cli.md shows both).
- Each batch of the job is one task. A worker loads the checkpoint once (the engine's
  synthesizer cache lives in the worker process) and checks its content hash against the
  job's, so a worker that sees another file under the same path refuses instead of
  rendering something else.
- Samples are seeded per index (:mod:`nucsynth.synthesize`), so which worker renders a batch
  does not change its pixels: the store equals a single-process run's when the workers use
  the same device and number of threads (a local cluster gives each worker this process'
  thread count).
- Results come back to this process, which appends them to the store in job order: one
  writer. A worker that dies (killed, out of memory) loses only its batch in flight, which
  the scheduler gives to another worker (a local cluster's nanny also restarts it); nothing
  is written twice, because only this process writes and it writes batch k once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

__all__ = ["DaskExecutor", "WorkerSpec", "render_batch"]


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to build the job's synthesizer."""

    checkpoint: str
    sha256: str
    image_checkpoint: str | None
    image_sha256: str | None
    device: str | None
    threads: int | None


def render_batch(spec: WorkerSpec, options: Any, items: Sequence[Any]) -> list[Any]:
    """Run on a worker: render one batch with the (cached) synthesizer of ``spec``."""
    import torch

    from nucsynth.synthesize import get_synthesizer

    if spec.threads:
        torch.set_num_threads(int(spec.threads))
    synth = get_synthesizer(spec.checkpoint, spec.device, image_checkpoint=spec.image_checkpoint)
    if synth.sha256 != spec.sha256 or synth.image_sha256 != spec.image_sha256:
        raise ValueError(f"the checkpoint at {spec.checkpoint} on this worker is not the job's "
                         f"(content hash {synth.sha256[:12]}... instead of {spec.sha256[:12]}...): give every worker "
                         "the same checkpoint files")
    return synth.render(list(items), options)


def _client(workers: int | None, scheduler: str | None) -> tuple[Any, Any]:
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise ValueError("--workers / --scheduler need dask.distributed: pip install 'napari-nucsynth[distributed]' "
                         "(or pip install distributed)") from None
    if scheduler is not None:
        if str(scheduler).endswith(".json"):
            if not Path(scheduler).is_file():
                raise FileNotFoundError(f"--scheduler {scheduler}: no scheduler file there")
            return Client(scheduler_file=str(scheduler)), None
        try:
            return Client(str(scheduler), timeout="30s"), None
        except OSError as e:
            raise ValueError(f"--scheduler {scheduler}: cannot reach a dask scheduler there ({e})") from None
    if workers is None or int(workers) < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    cluster = LocalCluster(n_workers=int(workers), threads_per_worker=1, processes=True, dashboard_address=None)
    return Client(cluster), cluster


class DaskExecutor:
    """Renders a job's batches on dask workers (module doc). ``device``: the device each
    worker renders on (default: each worker's best); ``threads``: torch threads per worker
    (default: this process' count on a local cluster, the workers' own on a remote one)."""

    def __init__(self, workers: int | None = None, scheduler: str | None = None, device: str | None = None,
                 threads: int | None = None) -> None:
        import torch

        if (workers is None) == (scheduler is None):
            raise ValueError("give either workers=N (a local cluster) or scheduler=ADDRESS (an existing one)")
        self.client, self.cluster = _client(workers, scheduler)
        self.device = device
        self.threads = threads if threads is not None else (torch.get_num_threads() if self.cluster is not None else None)

    def describe(self) -> str:
        """One line: where the batches are rendered."""
        n = len(self.client.scheduler_info().get("workers", {}))
        where = "a local dask cluster" if self.cluster is not None else f"the dask cluster at {self.client.scheduler.address}"
        return f"{where} ({n} workers" + (f", {self.threads} thread(s) each)" if self.threads else ")")

    def worker_pids(self) -> dict[str, int]:
        """Worker address -> process id (to watch or stop a worker)."""
        import os

        return self.client.run(os.getpid)

    def map(self, job: Any, batches: Sequence[tuple[int, list[Any]]],
            stopped: Callable[[], bool]) -> Iterator[tuple[int, list[Any]]]:
        """Submit every batch, then yield (batch number, samples) in job order; stop early
        (cancelling what is left) when ``stopped()``."""
        synth = job.synth
        spec = WorkerSpec(str(Path(synth.checkpoint).resolve()), synth.sha256,
                          None if synth.image_checkpoint is None else str(Path(synth.image_checkpoint).resolve()),
                          synth.image_sha256, self.device, self.threads)
        token = f"{synth.sha256[:12]}-{job.settings()['items_sha256'][:12]}"
        futures = [self.client.submit(render_batch, spec, job.options, items, key=f"nucsynth-batch-{token}-{k}",
                                      pure=False) for k, items in batches]
        try:
            for i, (k, _) in enumerate(batches):
                if stopped():
                    return
                samples = futures[i].result()
                futures[i].release()  # written here next: the cluster need not keep (or recompute) it
                yield k, samples
        finally:
            for fut in futures:
                fut.cancel()

    def close(self) -> None:
        """Disconnect (and stop a local cluster)."""
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()
