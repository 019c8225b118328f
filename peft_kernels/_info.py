"""Versions, the GPU (or none), and the backend table printed by ``python -m peft_kernels.info``."""

from __future__ import annotations

import platform

import torch

from peft_kernels import _backends, _config, _op


def versions() -> dict[str, str]:
    import peft_kernels

    out = {"peft_kernels": peft_kernels.__version__, "python": platform.python_version(), "torch": torch.__version__,
           "torch.cuda": str(torch.version.cuda)}
    ok, detail = _backends.triton_status()
    out["triton"] = detail if ok else "not available"
    for name in ("transformers", "peft"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = "not installed"
    ok, detail = _backends.native_status()
    out["peft_kernels._C"] = f"loaded ({detail})" if ok else f"not loaded: {detail}"
    return out


def device_description() -> str:
    if not torch.cuda.is_available():
        return "no CUDA device"
    props = torch.cuda.get_device_properties(0)
    mem = props.total_memory / 2**30
    return f"{props.name} (sm_{props.major}{props.minor}, {mem:.0f} GiB, {props.multi_processor_count} SMs)"


def info(file=None) -> str:
    """Print (and return) the versions, the device, the environment and, for CPU and CUDA tensors, every op's
    forward and backward backends: where they run, what they take, and why one cannot run here."""
    lines = ["peft_kernels info", ""]
    lines += [f"  {k:<16} {v}" for k, v in versions().items()]
    lines += [f"  {'device':<16} {device_description()}", ""]
    settings = _config.SETTINGS
    lines.append("environment: " + ", ".join(f"{k}={getattr(settings, k)}" for k in settings.__dataclass_fields__))
    lines.append("")
    for dev in ("cpu", "cuda"):
        lines.append(f"backends for {dev} tensors (pref: 1 = tried first; the reference is the last resort):")
        lines.append(f"  {'op':<24} {'dir':<4} {'backend':<10} {'pref':<5} {'dtypes':<28} status")
        for row in _op.table(dev):
            status = row["status"] + (f" ({row['note']})" if row["note"] else "")
            lines.append(f"  {row['op']:<24} {row['direction'][:3]:<4} {row['backend']:<10} {row['preference']:<5} "
                         f"{row['dtypes']:<28} {status}")
        lines.append("")
    text = "\n".join(lines)
    print(text, file=file)
    return text
