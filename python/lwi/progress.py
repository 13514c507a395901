"""Progress, cancelling and Ctrl-C for the long calls (segment, init-train, fine-tune).

Every long call passes the engine one trampoline, even without a progress sink: the engine calls it on the
calling thread at each step, and a non-zero return cancels the call (no partial output; training keeps its last
checkpoint). The trampoline never lets an exception escape into C (ctypes would print and swallow it): it keeps
the exception and cancels, and the call re-raises it unchanged — a `KeyboardInterrupt` stays one, a progress
callback's own error stays its own. On the main thread, Ctrl-C during the call only sets a flag that the next
step reads, so an interrupt is never lost between two steps."""
from __future__ import annotations

import contextlib
import ctypes
import math
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Union

from ._heap import kept_for_reuse
from ._native import PROGRESS_FN, LwiProgress
from .errors import Status


@dataclass(frozen=True)
class Progress:
    """One progress report of a long call."""

    stage: str
    """What is running: "read", "preprocess", "infer", "resample", "train", "validate", ..."""
    done: int
    total: int
    """0 when unknown."""
    epoch: Optional[int]
    """The training epoch, counted from 0; None outside training."""
    loss: Optional[float]
    metric: Optional[float]
    message: str
    rank: Optional[int]
    """This process's rank in a data-parallel training job, None for a single process."""

    @classmethod
    def from_c(cls, p: LwiProgress) -> "Progress":
        def number(x: float) -> Optional[float]:
            return None if math.isnan(x) else x

        return cls(
            stage=(p.stage or b"").decode("utf-8", "replace"),
            done=p.done,
            total=p.total,
            epoch=None if p.epoch < 0 else p.epoch,
            loss=number(p.loss),
            metric=number(p.metric),
            message=(p.message or b"").decode("utf-8", "replace"),
            rank=None if p.rank < 0 else p.rank,
        )


ProgressSink = Union[None, bool, Callable[[Progress], Any]]


class _Bar:
    """A tqdm bar over the engine's stages (one bar per stage, as the `lwi` command draws them)."""

    def __init__(self, tqdm: Any):
        self.tqdm = tqdm
        self.bar: Any = None
        self.stage = ""

    def __call__(self, p: Progress) -> None:
        if p.rank not in (None, 0):
            return
        if self.bar is None or p.stage != self.stage:
            self.close()
            self.stage = p.stage
            self.bar = self.tqdm(total=p.total or None, desc=p.stage, leave=False, file=sys.stderr)
        if p.total and self.bar.total != p.total:
            self.bar.total = p.total
        self.bar.n = p.done
        extra = {k: f"{v:.4g}" for k, v in (("loss", p.loss), ("dice", p.metric)) if v is not None}
        if p.epoch is not None:
            extra["epoch"] = str(p.epoch)
        if extra:
            self.bar.set_postfix(extra, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _default_sink() -> Optional[_Bar]:
    """A progress bar only where someone watches: stderr is a terminal and tqdm is installed."""
    try:
        interactive = sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):
        interactive = False
    if not interactive:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return _Bar(tqdm)


class Call:
    """The progress sink, cancel flag and pending exception of one long call."""

    def __init__(self, progress: ProgressSink, cancel: Optional[threading.Event]):
        self.sink: Optional[Callable[[Progress], Any]]
        if progress is None:
            self.sink = _default_sink()
        elif progress is False:
            self.sink = None
        elif progress is True:
            self.sink = _default_sink()
        elif callable(progress):
            self.sink = progress
        else:
            raise TypeError(f"progress must be None, a bool or a callable taking lwi.Progress, not {type(progress).__name__}")
        self.cancel = cancel if cancel is not None else threading.Event()
        self.interrupted = False
        self.exc: Optional[BaseException] = None
        # Kept referenced for the whole call: C holds this function pointer until the call returns.
        self.trampoline = PROGRESS_FN(self._on_progress)

    def _on_progress(self, _user: ctypes.c_void_p, p: "ctypes._Pointer[LwiProgress]") -> int:
        try:
            if self.cancel.is_set() or self.interrupted or self.exc is not None:
                return 1
            if self.sink is not None:
                self.sink(Progress.from_c(p.contents))
            return 0
        except BaseException as e:  # noqa: B036 - KeyboardInterrupt and the sink's own errors alike
            self.exc = e
            return 1

    def finish(self, status: int, raise_error: Callable[[int], None]) -> None:
        """After the engine returned `status`: re-raises what cancelled it, or the engine's error."""
        if isinstance(self.sink, _Bar):
            self.sink.close()
        if status == Status.CANCELLED:
            if self.exc is not None:
                raise self.exc
            if self.interrupted:
                raise KeyboardInterrupt
        if status != Status.OK:
            raise_error(status)

    @contextlib.contextmanager
    def ctrl_c_sets_flag(self) -> Iterator[None]:
        """On the main thread, while Python's default handler is in place: Ctrl-C only sets a flag for the
        call (raised as `KeyboardInterrupt` once the engine has stopped cleanly)."""
        main = threading.current_thread() is threading.main_thread()
        if not main or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            yield
            return

        def on_sigint(_signum: int, _frame: Any) -> None:
            self.interrupted = True

        signal.signal(signal.SIGINT, on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def run_long(call_engine: Callable[[Any], int], progress: ProgressSink, cancel: Optional[threading.Event],
             raise_error: Callable[[int], None]) -> None:
    """Runs one long engine call, `call_engine(trampoline) -> status`, with progress, cancel and Ctrl-C, and the
    allocator set as the `lwi` command sets it (_heap.py)."""
    call = Call(progress, cancel)
    with call.ctrl_c_sets_flag(), kept_for_reuse():
        status = call_engine(call.trampoline)
    call.finish(status, raise_error)


__all__ = ["Progress", "ProgressSink", "run_long"]
