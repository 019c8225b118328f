"""Kernel benchmarks CLI: ``python -m peft_kernels.bench [OP ...] [--device cpu|cuda] [--json PATH] ...``.

Kernel microbenchmarks: each op family's anchors (frozen floor, HF peft, eager, torch.compile, SDPA,
FlexAttention) beside ours under every backend, in one process. With no OP, every kernel family runs at the
default sizes of the device (the target sizes on CUDA, small ones on the CPU); ``e2e`` (the end-to-end
training benchmark, peft_kernels.bench.e2e) and ``overhead`` (host time per layer call on tiny CPU tensors,
one thread, beside HF peft's LoRA layer and each op's eager formula) run only when named.
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
from pathlib import Path

import torch

from peft_kernels.bench import cases as cases_mod
from peft_kernels.bench import harness, report

OPS = (*cases_mod.FAMILIES, "e2e", "overhead")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m peft_kernels.bench", description=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ops", nargs="*", metavar="OP",
                   help=f"op families to run: {', '.join(OPS)} (default: all but e2e)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--json", type=Path, default=None, metavar="PATH",
                   help="write the results here (default on CUDA: benchmarks/results/<device>/<date>.json)")
    p.add_argument("--plot", type=Path, default=None, metavar="PATH",
                   help="write a PNG bar chart of the ratios")
    p.add_argument("--quick", action="store_true", help="fewer repetitions and only the first shape per op")
    p.add_argument("--fwd", action="store_true", help="also time the forward alone")
    p.add_argument("--variants", nargs="+", default=None, metavar="GLOB",
                   help="only variants matching one of these globs (the floors always run)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (on a shared, loaded machine 1 gives steadier CPU numbers)")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _select_ops(parser: argparse.ArgumentParser, ops: list[str]) -> list[str]:
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        parser.error(f"unknown op(s) {', '.join(unknown)}; choose from {', '.join(OPS)}")
    return list(dict.fromkeys(ops)) if ops else list(cases_mod.FAMILIES)


def _filter(cases: list[harness.Case], globs: list[str] | None) -> list[harness.Case]:
    if not globs:
        return cases
    return [c for c in cases if c.floor or any(fnmatch.fnmatch(c.variant, g) for g in globs)]


def _list(cases: list[harness.Case], device: str, with_e2e: bool) -> None:
    print(f"cases for --device {device} (* = the floor the ratios divide by):")
    prev = None
    for c in cases:
        if (c.family, c.shape) != prev:
            print(f"  {c.family}  [{c.shape}]")
            prev = (c.family, c.shape)
        print(f"      {c.variant}{' *' if c.floor else ''}{f'  ({c.note})' if c.note else ''}")
    if with_e2e:
        print("  e2e  [peft_kernels.bench.e2e: a training step per PEFT method beside the frozen model]")


def run_e2e(device: str, json_path: Path | None, quick: bool) -> int:
    from peft_kernels.bench import e2e

    argv = ["--device", device] + (["--json", str(json_path)] if json_path else [])
    argv += ["--quick"] if quick else []
    try:
        rc = e2e.main(argv)
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except Exception as exc:  # noqa: BLE001  (report, don't crash the rest of the suite's output)
        print(f"e2e: failed: {type(exc).__name__}: {exc}")
        return 1
    return int(rc or 0)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    ops = _select_ops(parser, args.ops)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    families = [o for o in ops if o not in ("e2e", "overhead")]
    cases = _filter(cases_mod.build_cases(families, device, args.quick), args.variants)

    if args.list:
        _list(cases, device, "e2e" in ops or not args.ops)
        return 0
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)

    rc = 0
    if families:
        env = report.environment(device)
        print(f"peft_kernels bench on {env['device']}: torch {env['torch']}, triton {env['triton']}, "
              f"peft {env['peft']}, transformers {env['transformers']}, git {env['git_sha'][:12]}",
              flush=True)
        settings = harness.Settings(device=device, quick=args.quick, fwd=args.fwd)
        rows = harness.run_cases(cases, settings, progress=not args.no_progress)
        print(report.format_table(rows, with_fwd=args.fwd), flush=True)

        timing = "perf_counter median"
        if device == "cuda":
            has_triton = report._version("triton") != "not installed"
            timing = "triton.testing.do_bench median" if has_triton else "CUDA events median"
        data = report.to_json(rows, env, {"ops": families, "quick": args.quick, "fwd": args.fwd,
                                          "variants": args.variants, "threads": torch.get_num_threads(),
                                          "timing": timing, "argv": sys.argv[1:]})
        json_path = args.json or (report.default_json_path(env) if device == "cuda" else None)
        if json_path is not None:
            print(f"json: {report.write_json(data, json_path)}")
        if args.plot is not None:
            title = f"{env['device']} | torch {env['torch']} | {env['date_utc'][:10]}"
            try:
                written = report.write_plot(rows, args.plot, title)
                print(f"plot: {written}" if written else "plot: nothing to plot (no ratios)")
            except ImportError as exc:  # the table and JSON are the results; the picture is optional
                print(f"plot: skipped ({exc})")
        if any(r.status == "error" or r.reason == "interrupted" for r in rows):
            rc = 1
    if "overhead" in ops:
        from peft_kernels.bench import overhead

        overhead.main(quick=args.quick)
    if "e2e" in ops:
        e2e_json = args.json if not families else None  # alone, `e2e --json PATH` is e2e's own output
        rc = max(rc, run_e2e(device, e2e_json, args.quick))
    return rc


if __name__ == "__main__":
    sys.exit(main())
