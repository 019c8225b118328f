"""Timing and memory measurement for benchmark cases.

A case is (op family, shape label, variant name, setup). ``setup()`` builds fresh random inputs and returns a
closure that runs one fwd+bwd step (or a :class:`Workload` that also carries a forward-only closure and a
note). A variant that cannot run here raises :class:`Skip` (or ImportError / NotImplementedError, which a
missing dependency or a strict backend raises) and is reported as skipped with the reason; any other
exception is reported as an error with its traceback. Nothing a case does stops the run.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch


class Skip(Exception):
    """Raised by a case's setup when the variant cannot run here; the message is the reason."""


@dataclass
class Workload:
    fwd_bwd: Callable[[], object]
    fwd: Callable[[], object] | None = None
    note: str = ""


@dataclass
class Case:
    family: str
    shape: str
    variant: str
    setup: Callable[[], Callable[[], object] | Workload]
    floor: bool = False  # the baseline of this (family, shape): the ratio column divides by its time
    note: str = ""
    compiled: bool = False  # uses torch.compile: reset dynamo afterwards so later cases start clean


@dataclass
class Settings:
    device: str = "cpu"
    quick: bool = False
    fwd: bool = False  # also time the forward alone


@dataclass
class Row:
    family: str
    shape: str
    variant: str
    status: str  # "ok" | "skipped" | "error"
    reason: str = ""
    ms: float | None = None
    ms_fwd: float | None = None
    ratio: float | None = None
    peak_mb: float | None = None
    floor: bool = False
    note: str = ""
    traceback: str = ""
    extra: dict = field(default_factory=dict)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------
def _cpu_time_ms(fn: Callable[[], object], quick: bool) -> float:
    # Few reps under a time budget: the whole CPU suite has to finish in about a minute on shared cores.
    warmup, min_reps, max_reps, budget_s = (1, 3, 5, 0.1) if quick else (2, 5, 50, 0.25)
    for _ in range(warmup):
        fn()
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _cuda_events_time_ms(fn: Callable[[], object], quick: bool) -> float:
    warmup, reps = (3, 10) if quick else (10, 50)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _cuda_time_ms(fn: Callable[[], object], quick: bool) -> float:
    try:
        from triton.testing import do_bench
    except ImportError:
        return _cuda_events_time_ms(fn, quick)
    # do_bench flushes L2 between reps and takes warmup/rep in milliseconds of run time, not counts.
    warmup, rep = (5, 20) if quick else (25, 100)
    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def time_callable(fn: Callable[[], object], device: str = "cpu", quick: bool = False) -> float:
    """Median milliseconds of ``fn()`` after warm-up (CUDA: triton do_bench or CUDA events)."""
    if device == "cuda":
        return _cuda_time_ms(fn, quick)
    return _cpu_time_ms(fn, quick)


def peak_memory_mb(fn: Callable[[], object], device: str = "cpu") -> float | None:
    """Peak CUDA memory of one ``fn()`` above what was allocated before it (MiB); None on the CPU."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


# --------------------------------------------------------------------------------------------------
# Running cases
# --------------------------------------------------------------------------------------------------
def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    msg = text[0] if text else ""
    return f"{type(exc).__name__}: {msg}" if not isinstance(exc, Skip) else msg


def _cleanup(device: str, compiled: bool, cuda_baseline: int) -> None:
    if compiled:
        try:
            import torch._dynamo

            torch._dynamo.reset()
        except Exception:  # noqa: BLE001  (cleanup must never fail the run)
            pass
    if device == "cuda":
        # gc.collect costs ~0.3 s with transformers loaded: only when a reference cycle still holds memory.
        if torch.cuda.memory_allocated() > cuda_baseline + 2**26:
            gc.collect()
        torch.cuda.empty_cache()


def _cuda_alive() -> str | None:
    """None when the CUDA context still works; after a kernel fault every later launch would fail too."""
    try:
        torch.cuda.synchronize()
        torch.ones(1, device="cuda").add_(1).item()
    except Exception as exc:  # noqa: BLE001
        return _one_line(exc)
    return None


def run_case(case: Case, settings: Settings) -> Row:
    row = Row(case.family, case.shape, case.variant, "ok", floor=case.floor, note=case.note)
    device = settings.device
    cuda_baseline = torch.cuda.memory_allocated() if device == "cuda" else 0
    work = None
    try:
        torch.manual_seed(0)
        work = case.setup()
        if not isinstance(work, Workload):
            work = Workload(work)
        if work.note:
            row.note = f"{row.note}; {work.note}" if row.note else work.note
        # First call outside the timings: compiles, autotunes, and raises here if the variant cannot run.
        work.fwd_bwd()
        sync(device)
        row.peak_mb = peak_memory_mb(work.fwd_bwd, device)
        row.ms = time_callable(work.fwd_bwd, device, settings.quick)
        if settings.fwd and work.fwd is not None:
            row.ms_fwd = time_callable(work.fwd, device, settings.quick)
    except (Skip, ImportError, NotImplementedError) as exc:
        row.status, row.reason, row.peak_mb, row.ms = "skipped", _one_line(exc), None, None
    except Exception as exc:  # noqa: BLE001  (a failing variant is a result, not a crash)
        row.status, row.reason, row.peak_mb, row.ms = "error", _one_line(exc), None, None
        row.traceback = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-6))
    finally:
        del work
        _cleanup(device, case.compiled, cuda_baseline)
    return row


def run_cases(cases: Sequence[Case], settings: Settings, progress: bool = True) -> list[Row]:
    """Run every case in order (anchors beside ours, in the same process) with a progress bar."""
    from tqdm.auto import tqdm

    rows: list[Row] = []
    dead: str | None = None
    bar = tqdm(cases, desc="bench", unit="case", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for case in bar:
        bar.set_postfix_str(f"{case.family} {case.shape} {case.variant}", refresh=False)
        if dead is None:
            try:
                row = run_case(case, settings)
            except KeyboardInterrupt:
                # Ctrl-C or `timeout -s INT`: keep what ran, report the rest, still write the table and JSON.
                dead = "interrupted"
            else:
                rows.append(row)
                if row.status == "error" and settings.device == "cuda":
                    reason = _cuda_alive()
                    dead = None if reason is None else f"CUDA context unusable after an earlier error ({reason})"
        if dead is not None:
            rows.append(Row(case.family, case.shape, case.variant, "skipped", floor=case.floor, reason=dead))
    bar.close()
    add_ratios(rows)
    return rows


def add_ratios(rows: Sequence[Row]) -> None:
    """ratio = ms / ms of the floor variant of the same (family, shape), where that floor ran."""
    floors = {(r.family, r.shape): r.ms for r in rows if r.floor and r.status == "ok" and r.ms}
    for r in rows:
        base = floors.get((r.family, r.shape))
        r.ratio = r.ms / base if (base and r.ms is not None) else None
