"""Crash-safe saving and checked loading of adapter files, shared by every save/load of the library.

Saving: every file is first written in full to a temporary name in its own directory and fsync'ed; only then
is it renamed over the old one (``os.replace``, atomic on POSIX and Windows). A process killed while writing
leaves the old file intact beside a stray temporary file. A directory of several files (weights + config) is
staged the same way and renamed in the order the files were staged, once all of them are on disk, so that the
only window in which old and new files sit side by side is between two renames (no data is written then):
stage the config last, so an interrupted save still shows the old config.

Loading: a missing, truncated or malformed file, or a tensor that cannot be an adapter weight (an integer
dtype, NaN / inf), raises ``ValueError`` (``FileNotFoundError`` when absent) naming the caller, the file and
what is wrong. Nothing is changed by these functions: callers read and check everything before they touch a
model.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

_TMP_TAG = ".pk-tmp-"


def _tmp_path(path: str) -> str:
    d, base = os.path.split(path)
    return os.path.join(d, f".{base}{_TMP_TAG}{os.getpid()}-{secrets.token_hex(4)}")


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory or ".", os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows, where directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


def _remove_stale(path: str) -> None:
    """Temporary files of earlier saves of ``path`` that were killed before their rename."""
    d, base = os.path.split(path)
    for stale in glob.glob(os.path.join(glob.escape(d), f".{glob.escape(base)}{_TMP_TAG}*")):
        _remove_quietly(stale)


class StagedFiles:
    """Files written to temporary names, renamed into place by :func:`atomic_files` on success."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._staged: list[tuple[str, str]] = []  # (temporary path, final path), in staging order

    def _stage(self, name: str, write: Callable[[str], None]) -> str:
        if os.path.basename(name) != name or name in ("", ".", ".."):
            raise ValueError(f"atomic_files: {name!r} must be a plain file name inside the directory")
        final = os.path.join(self.directory, name)
        tmp = _tmp_path(final)
        self._staged.append((tmp, final))
        write(tmp)
        _fsync_file(tmp)
        return final

    def write_bytes(self, name: str, data: bytes) -> str:
        def write(tmp):
            with open(tmp, "wb") as f:
                f.write(data)

        return self._stage(name, write)

    def write_json(self, name: str, obj) -> str:
        text = json.dumps(obj, indent=2, sort_keys=True)
        return self.write_bytes(name, (text + "\n").encode())

    def save_safetensors(self, name: str, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> str:
        from safetensors.torch import save_file

        cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        return self._stage(name, lambda tmp: save_file(cpu, tmp, metadata={"format": "pt", **(metadata or {})}))

    def save_torch(self, name: str, obj) -> str:
        return self._stage(name, lambda tmp: torch.save(obj, tmp))

    def _commit(self) -> None:
        for tmp, final in self._staged:
            os.replace(tmp, final)
        _fsync_dir(self.directory)
        for _, final in self._staged:
            _remove_stale(final)

    def _abort(self) -> None:
        for tmp, _ in self._staged:
            _remove_quietly(tmp)


def check_save_directory(owner: str, directory) -> str:
    """A directory to save into: a str or os.PathLike that is not an existing file."""
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"{owner}: the save directory must be a str or os.PathLike, got {type(directory).__name__}")
    directory = os.fspath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"{owner}: {directory!r} is an existing file, not a directory to save into")
    return directory


@contextlib.contextmanager
def atomic_files(directory: str | os.PathLike, *, owner: str = "peft_kernels") -> Iterator[StagedFiles]:
    """Stage several files of ``directory`` and put them in place together when the block ends without error::

        with atomic_files(path) as out:
            out.save_safetensors("adapter_model.safetensors", tensors)
            out.write_json("adapter_config.json", config)   # staged last: renamed last

    On an exception (or a kill) no file of ``directory`` has changed; temporary files are removed (or, after
    a kill, left as hidden ``.NAME.pk-tmp-*`` files that the next save of that name removes).
    """
    directory = check_save_directory(owner, directory)
    os.makedirs(directory, exist_ok=True)
    staged = StagedFiles(directory)
    try:
        yield staged
    except BaseException:
        staged._abort()
        raise
    staged._commit()


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    """Write one JSON file atomically (see the module docstring)."""
    d, name = os.path.split(os.fspath(path))
    with atomic_files(d or ".") as out:
        out.write_json(name, obj)


def atomic_save_safetensors(path: str | os.PathLike, tensors: dict[str, Tensor], metadata=None) -> None:
    """Write one safetensors file atomically (see the module docstring)."""
    d, name = os.path.split(os.fspath(path))
    with atomic_files(d or ".") as out:
        out.save_safetensors(name, tensors, metadata)


# --------------------------------------------------------------------------------------------------
# Checked loads
# --------------------------------------------------------------------------------------------------
def _require_file(path: str, owner: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{owner}: {path!r} does not exist (or is not a file)")


def read_json(path: str | os.PathLike, *, owner: str) -> dict:
    """A JSON object from ``path``; ValueError naming the file when it is empty, malformed or not an object."""
    path = os.fspath(path)
    _require_file(path, owner)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{owner}: cannot read {path!r}: {exc}") from exc
    if not text.strip():
        raise ValueError(f"{owner}: {path!r} is empty (an interrupted save?)")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{owner}: {path!r} is not valid JSON ({exc.msg} at line {exc.lineno} column "
                         f"{exc.colno}); the file is damaged or truncated") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{owner}: {path!r} must hold a JSON object, got a {type(obj).__name__}")
    return obj


def check_tensors(tensors: dict[str, Tensor], path: str, *, owner: str, floating: bool = True,
                  finite: bool = True) -> dict[str, Tensor]:
    """Refuse tensors that cannot be trained weights: a non-floating dtype (``floating``) or NaN / inf values
    (``finite``), naming the file and the first offending key. Returns ``tensors``."""
    for key, t in tensors.items():
        if not isinstance(t, Tensor):
            raise ValueError(f"{owner}: {path!r}: entry {key!r} is a {type(t).__name__}, not a tensor")
        if floating and not t.is_floating_point():
            raise ValueError(f"{owner}: {path!r}: tensor {key!r} has dtype {t.dtype}; adapter weights must be "
                             "floating point (refusing to cast)")
        if finite and t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            what = "all NaN/inf" if bad == t.numel() else f"{bad} of {t.numel()} values NaN/inf"
            raise ValueError(f"{owner}: {path!r}: tensor {key!r} is {what}; the adapter is damaged "
                             "(a diverged run or a corrupted file)")
    return tensors


def load_safetensors(path: str | os.PathLike, *, owner: str, floating: bool = True,
                     finite: bool = True) -> dict[str, Tensor]:
    """Every tensor of a safetensors file, on the CPU, checked with :func:`check_tensors`."""
    path = os.fspath(path)
    _require_file(path, owner)
    from safetensors.torch import load_file

    try:
        tensors = load_file(path, device="cpu")
    except Exception as exc:  # SafetensorError, OSError, ...: all mean the file is unusable
        raise ValueError(f"{owner}: {path!r} is not a readable safetensors file ({type(exc).__name__}: {exc}); "
                         "it is truncated or damaged") from exc
    return check_tensors(tensors, path, owner=owner, floating=floating, finite=finite)


def load_torch_state(path: str | os.PathLike, *, owner: str, floating: bool = True,
                     finite: bool = True) -> dict[str, Tensor]:
    """A ``torch.save``'d dict of tensors (``weights_only``), checked with :func:`check_tensors`."""
    path = os.fspath(path)
    _require_file(path, owner)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{owner}: {path!r} is not a readable torch checkpoint ({type(exc).__name__}: {exc}); "
                         "it is truncated or damaged") from exc
    if not isinstance(state, dict):
        raise ValueError(f"{owner}: {path!r} must hold a dict of tensors, got a {type(state).__name__}")
    return check_tensors(state, path, owner=owner, floating=floating, finite=finite)
