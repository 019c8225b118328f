"""Reporting: a table on stdout, a JSON record (environment + every row), a PNG of the ratios."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import platform
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

import torch

from peft_kernels.bench.harness import Row

# Default results folder, relative to the working directory (the repository root for `make bench`).
RESULTS_DIR = Path("benchmarks") / "results"


# --------------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------------
def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {model} ({torch.get_num_threads()} threads)"


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def git_sha() -> str:
    try:
        # The commit of the checkout this package runs from (an editable install); "unknown" from a wheel.
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", sha) else "unknown"


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001  (a broken optional install must not stop the report)
        return "not installed"


def environment(device: str) -> dict:
    from peft_kernels import __version__, _backends

    native_ok, native = _backends.native_status()
    return {
        "device": device_name(device),
        "device_type": device,
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "python": platform.python_version(),
        "peft_kernels": __version__,
        "peft_kernels_native": native if native_ok else "not loaded",
        "git_sha": git_sha(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


# --------------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------------
def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: Sequence[Row], with_fwd: bool = False) -> str:
    """Aligned table; skip/error reasons become numbered footnotes so the columns stay readable."""
    notes: dict[str, int] = {}
    header = ["op", "shape", "variant", "ms", *(["fwd ms"] if with_fwd else []), "ratio", "peak MB", "status"]
    body = []
    for r in rows:
        if r.status == "ok":
            status = "ok" + (f" ({r.note})" if r.note else "")
        else:
            key = f"{r.status}: {r.reason}"
            n = notes.setdefault(key, len(notes) + 1)
            status = f"{r.status} [{n}]"
        cells = [r.family, r.shape, r.variant + (" *" if r.floor else ""), _fmt(r.ms, ".3f")]
        if with_fwd:
            cells.append(_fmt(r.ms_fwd, ".3f"))
        cells += [_fmt(r.ratio, ".2f") + ("x" if r.ratio is not None else ""), _fmt(r.peak_mb, ".1f"), status]
        body.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]
    numeric = {3, 4, 5, 6} if with_fwd else {3, 4, 5}

    def line(cells):
        return "  ".join(str(c).rjust(w) if i in numeric else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    prev = None
    for r, cells in zip(rows, body):
        if prev is not None and (r.family, r.shape) != prev:
            out.append("")
        prev = (r.family, r.shape)
        out.append(line(cells))
    out.append("")
    out.append("ms = median fwd+bwd; ratio = ms / ms of the row marked * (the floor) of the same op, shape.")
    out += [f"[{n}] {text}" for text, n in notes.items()]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------
# JSON and plot
# --------------------------------------------------------------------------------------------------
def to_json(rows: Sequence[Row], env: dict, settings: dict | None = None) -> dict:
    return {**env, "settings": settings or {}, "rows": [dataclasses.asdict(r) for r in rows]}


def default_json_path(env: dict, root: Path = RESULTS_DIR) -> Path:
    """benchmarks/results/<device-slug>/<YYYY-MM-DD>.json, with -2, -3... rather than overwrite a run."""
    folder = root / device_slug(env["device"])
    day = env["date_utc"][:10]
    path, n = folder / f"{day}.json", 2
    while path.exists():
        path, n = folder / f"{day}-{n}.json", n + 1
    return path


def write_json(data: dict, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    return path


def write_plot(rows: Sequence[Row], path: Path, title: str = "") -> Path | None:
    """Horizontal bars of ratio-to-floor per (op, shape); None when no row has a ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        if r.ratio is not None:
            groups.setdefault((r.family, r.shape), []).append(r)
    if not groups:
        return None
    ncols = 2 if len(groups) > 1 else 1
    nrows = -(-len(groups) // ncols)
    tallest = max(len(g) for g in groups.values())
    fig, axes = plt.subplots(nrows, ncols, figsize=(7 * ncols, (0.32 * tallest + 1.1) * nrows), squeeze=False)
    for ax, ((fam, shape), group) in zip(axes.flat, groups.items()):
        names = [r.variant for r in group]
        ratios = [r.ratio for r in group]
        colors = ["0.6" if r.floor else ("tab:orange" if r.variant.startswith("ours") else "tab:blue")
                  for r in group]
        ax.barh(range(len(group)), ratios, color=colors)
        ax.set_yticks(range(len(group)), names, fontsize=8)
        ax.invert_yaxis()
        ax.axvline(1.0, color="k", lw=0.8, ls="--")
        for i, v in enumerate(ratios):
            ax.text(v, i, f" {v:.2f}x", va="center", fontsize=7)
        ax.set_title(f"{fam}: {shape}", fontsize=9)
        ax.set_xlabel("time / floor", fontsize=8)
        ax.set_xlim(0, max(ratios) * 1.18)
    for ax in list(axes.flat)[len(groups):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
