"""peft_kernels.patch._io: atomic saves (checked with a process killed mid-write) and checked loads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from peft_kernels.patch import _io

safetensors = pytest.importorskip("safetensors")


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).double()}


def test_atomic_files_round_trip(tmp_path):
    t = _tensors()
    with _io.atomic_files(tmp_path / "out") as out:
        out.save_safetensors("w.safetensors", t)
        out.write_json("c.json", {"x": 1})
    got = _io.load_safetensors(tmp_path / "out" / "w.safetensors", owner="t")
    assert set(got) == {"a", "b"} and torch.equal(got["a"], t["a"]) and torch.equal(got["b"], t["b"])
    assert _io.read_json(tmp_path / "out" / "c.json", owner="t") == {"x": 1}
    assert sorted(os.listdir(tmp_path / "out")) == ["c.json", "w.safetensors"]  # no temporary left


def test_atomic_files_exception_keeps_old_files(tmp_path):
    _io.atomic_write_json(tmp_path / "c.json", {"old": True})
    with pytest.raises(RuntimeError, match="boom"), _io.atomic_files(tmp_path) as out:
        out.write_json("c.json", {"old": False})
        raise RuntimeError("boom")
    assert _io.read_json(tmp_path / "c.json", owner="t") == {"old": True}
    assert os.listdir(tmp_path) == ["c.json"]


def test_rejects_names_outside_directory(tmp_path):
    with pytest.raises(ValueError, match="plain file name"), _io.atomic_files(tmp_path) as out:
        out.write_json("../x.json", {})


_KILLED_SAVE = textwrap.dedent("""
    import os, sys, torch
    from peft_kernels.patch import _io
    from safetensors import torch as st
    real = st.save_file
    def slow_save(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        with open(path, "r+b") as f:   # half the file is on disk when the parent kills us
            f.truncate(os.path.getsize(path) // 2)
        print("WRITING", flush=True)
        sys.stdin.read()
    st.save_file = slow_save
    with _io.atomic_files(sys.argv[1]) as out:
        out.save_safetensors("w.safetensors", {"a": torch.full((64, 64), 2.0)})
        out.write_json("c.json", {"version": "new"})
""")


def test_killed_save_leaves_old_files_loadable(tmp_path):
    old = _tensors(1)
    with _io.atomic_files(tmp_path) as out:
        out.save_safetensors("w.safetensors", old)
        out.write_json("c.json", {"version": "old"})
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, str(tmp_path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "WRITING"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    got = _io.load_safetensors(tmp_path / "w.safetensors", owner="t")
    assert torch.equal(got["a"], old["a"])
    assert _io.read_json(tmp_path / "c.json", owner="t") == {"version": "old"}
    stray = [n for n in os.listdir(tmp_path) if n.startswith(".")]
    assert len(stray) == 1  # the killed save's temporary file; the next save removes it
    _io.atomic_save_safetensors(tmp_path / "w.safetensors", old)
    assert sorted(os.listdir(tmp_path)) == ["c.json", "w.safetensors"]


def test_truncated_safetensors_names_the_file(tmp_path):
    p = tmp_path / "w.safetensors"
    _io.atomic_save_safetensors(p, _tensors())
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 20])
    with pytest.raises(ValueError, match=r"load_x: .*w\.safetensors.*truncated or damaged"):
        _io.load_safetensors(p, owner="load_x")


@pytest.mark.parametrize("text,why", [("", "empty"), ('{"r": 8,', "not valid JSON"), ("[1, 2]", "JSON object")])
def test_bad_json_names_the_file(tmp_path, text, why):
    p = tmp_path / "c.json"
    p.write_text(text)
    with pytest.raises(ValueError, match=rf"load_x: .*c\.json.*{why}"):
        _io.read_json(p, owner="load_x")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="load_x: .*nope.json"):
        _io.read_json(tmp_path / "nope.json", owner="load_x")


@pytest.mark.parametrize("bad,why", [
    (torch.arange(6).reshape(2, 3), "dtype torch.int64"),
    (torch.full((2, 3), float("nan")), "all NaN/inf"),
    (torch.tensor([1.0, float("inf"), 2.0]), "1 of 3 values NaN/inf"),
])
def test_refuses_non_weight_tensors(tmp_path, bad, why):
    p = tmp_path / "w.safetensors"
    _io.atomic_save_safetensors(p, {"good": torch.randn(2), "bad": bad})
    with pytest.raises(ValueError, match=rf"load_x: .*w\.safetensors.*'bad'.*{why}"):
        _io.load_safetensors(p, owner="load_x")
    assert _io.load_safetensors(p, owner="load_x", floating=False, finite=False)["bad"].shape == bad.shape


def test_torch_state(tmp_path):
    p = tmp_path / "w.bin"
    with _io.atomic_files(tmp_path) as out:
        out.save_torch("w.bin", {"a": torch.randn(3)})
    assert _io.load_torch_state(p, owner="t")["a"].shape == (3,)
    p.write_bytes(p.read_bytes()[:10])
    with pytest.raises(ValueError, match=r"w\.bin.*truncated or damaged"):
        _io.load_torch_state(p, owner="t")
    p.write_text(json.dumps([1]))
    with pytest.raises(ValueError, match=r"w\.bin"):
        _io.load_torch_state(p, owner="t")
