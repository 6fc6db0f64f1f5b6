"""The plugin's one bridge between long engine work and napari's main (Qt) thread.

- :func:`engine_steps` runs an engine call that reports ``progress(i, n)`` in a helper
  thread and turns the reports into yielded ``(i, n)`` pairs. Cancelling stops the engine
  at its next network pass (a torch forward pre-hook raises in the cancelled thread), so a
  sampler step is never waited out.
- :class:`Job` runs a generator function in a napari thread worker with a progress bar in
  napari's activity panel (cancelable there too), a busy cursor, and handlers that are
  called on the main thread only, where layers may be touched. Cancel returns at once:
  the worker's late results are dropped, and the next job's engine call waits until the
  cancelled one has stopped (one engine computation at a time).

No science and no layers here: docks pass in what to run and what to do with the result.

The worker threads run at the process's own priority on purpose: a lowered ("niced")
worker that holds the GIL when the OS preempts it keeps the main thread waiting for the GIL
until the worker is scheduled again. Measured with two busy background processes
(tests/test_plugin_heartbeat.py): the viewer stalled 317-742 ms during Random layout and a
render with niced workers, 21-50 ms without.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Generator
from typing import Any, Callable

__all__ = ["Cancelled", "engine_steps", "Job", "run_now"]

_ENGINE_LOCK = threading.Lock()  # one engine computation at a time (a cancelled one may still be winding down)
_CANCEL_OF_THREAD: dict[int, threading.Event] = {}
_HOOK: list[Any] = []


class Cancelled(Exception):
    """Raised inside the engine thread to stop it (between steps or network passes)."""


def _check_cancel(*_: Any) -> None:
    ev = _CANCEL_OF_THREAD.get(threading.get_ident())
    if ev is not None and ev.is_set():
        raise Cancelled()


def _install_pass_hook() -> None:
    """A global torch forward pre-hook: any module called in a cancelled engine thread
    raises :class:`Cancelled` (other threads pay one dict lookup per module call)."""
    if _HOOK:
        return
    import torch

    _HOOK.append(torch.nn.modules.module.register_module_forward_pre_hook(_check_cancel))


def engine_steps(
    call: Callable[[Callable[[int, int], None]], Any], cancel: threading.Event | None = None
) -> Generator[tuple[int, int], None, Any]:
    """Run ``call(progress)`` (an engine function taking a ``progress(i, n)`` callback) in a
    helper thread; yield each ``(i, n)`` it reports and return its result, or None when
    ``cancel`` was set. Its errors are re-raised here. Closing the generator early cancels
    the engine too; the helper thread is not waited for (it stops at its next network pass).
    """
    cancel = cancel or threading.Event()
    events: queue.Queue = queue.Queue()
    outcome: dict[str, Any] = {}

    def progress(i: int, n: int) -> None:
        if cancel.is_set():
            raise Cancelled()
        events.put((int(i), int(n)))

    def run() -> None:
        with _ENGINE_LOCK:
            _CANCEL_OF_THREAD[threading.get_ident()] = cancel
            try:
                if cancel.is_set():
                    raise Cancelled()
                _install_pass_hook()
                outcome["result"] = call(progress)
            except Cancelled:
                outcome["cancelled"] = True
            except BaseException as e:  # handed to the consumer's thread below
                outcome["error"] = e
            finally:
                _CANCEL_OF_THREAD.pop(threading.get_ident(), None)
                events.put(None)

    thread = threading.Thread(target=run, name="nucsynth-engine", daemon=True)
    thread.start()
    ended = False
    try:
        while True:
            try:
                item = events.get(timeout=0.05)
            except queue.Empty:
                if cancel.is_set():  # do not wait for the engine's next report
                    return None
                continue
            if item is None:
                ended = True
                break
            yield item
    finally:
        if not ended:  # the consumer stopped early: stop the engine too
            cancel.set()
    if "error" in outcome:
        raise outcome["error"]
    if outcome.get("cancelled"):
        return None
    return outcome["result"]


def run_now(gen: Generator[Any, None, Any]) -> Any:
    """Drive a job generator to its end in the calling thread; return its return value."""
    try:
        while True:
            next(gen)
    except StopIteration as done:
        return done.value


def _body(func: Callable[..., Any], args: tuple, kwargs: dict) -> Generator[Any, None, Any]:
    """Worker body: a generator function is driven (its yields are progress), a plain
    function is called once."""
    out = func(*args, **kwargs)
    if isinstance(out, Generator):
        return (yield from out)
    yield None  # a plain function: one yield so the worker is a generator worker (cancelable)
    return out


class Job:
    """One long action of a dock, run off the main thread.

    ``on_done(result)``, ``on_error(exc)``, ``on_progress((i, n))`` and ``on_end()`` run on
    the main thread; ``on_end`` always runs once (after done, error or cancel). A cancelled
    job calls neither ``on_done`` nor ``on_error``.
    """

    def __init__(
        self,
        desc: str,
        on_done: Callable[[Any], None],
        on_error: Callable[[BaseException], None],
        on_progress: Callable[[tuple[int, int]], None] | None = None,
        on_end: Callable[[], None] | None = None,
        total: int = 0,
    ) -> None:
        self.desc = desc
        self.cancel_event = threading.Event()
        self._on_done, self._on_error = on_done, on_error
        self._on_progress, self._on_end = on_progress, on_end
        self._total = int(total)
        self.worker: Any = None
        self.pbar: Any = None
        self.cancelled = False
        self.returned_at: float | None = None
        self._ended = False

    @property
    def running(self) -> bool:
        """Whether the job has started and not yet ended (done, failed or cancelled)."""
        return self.worker is not None and not self._ended

    def start(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> "Job":
        """Run ``func(*args, **kwargs)`` in a worker (a generator yielding ``(i, n)`` or a
        plain function)."""
        from napari.qt.threading import create_worker
        from napari.utils.progress import cancelable_progress
        from qtpy.QtCore import Qt
        from qtpy.QtWidgets import QApplication

        worker = create_worker(_body, func, args, kwargs, _start_thread=False, _ignore_errors=True)
        worker.yielded.connect(self._yielded)
        worker.returned.connect(self._returned)
        worker.errored.connect(self._errored)
        worker.finished.connect(self._end)
        self.worker = worker
        self.pbar = cancelable_progress(total=self._total, desc=self.desc, cancel_callback=self.cancel)
        QApplication.setOverrideCursor(Qt.CursorShape.BusyCursor)
        worker.start()
        return self

    def cancel(self) -> None:
        """Stop now: the dock is idle when this returns; the engine stops at its next pass."""
        if not self.running:
            return
        self.cancelled = True
        self.cancel_event.set()
        self.worker.quit()
        self._end()

    # ------------------------------------------------------------------ main-thread handlers
    def _yielded(self, item: Any) -> None:
        if self._ended or item is None or self.returned_at is not None:  # late reports change nothing
            return
        i, n = item
        if self.pbar is not None:
            if self.pbar.total != n:
                self.pbar.total = n
            self.pbar.update(i - self.pbar.n)
        if self._on_progress is not None:
            self._on_progress((i, n))

    def _returned(self, result: Any) -> None:
        if self._ended or self.cancel_event.is_set():
            return
        self.returned_at = time.perf_counter()  # the work is done; showing the result starts
        self._on_done(result)

    def _errored(self, exc: BaseException) -> None:
        if self._ended or self.cancel_event.is_set():
            return
        self._on_error(exc)

    def _end(self) -> None:
        if self._ended:
            return
        self._ended = True
        from qtpy.QtWidgets import QApplication

        if self.pbar is not None:
            self.pbar.close()
            self.pbar = None
        QApplication.restoreOverrideCursor()
        if self._on_end is not None:
            self._on_end()
