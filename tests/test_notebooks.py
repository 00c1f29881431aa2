"""Every notebook in ``colab/`` runs top to bottom with its default parameters and no cell errors.

The kernel is this interpreter (a kernel spec written to a temporary ``JUPYTER_PATH``), so the notebook sees the
same installed ``lcm``. Compiled XLA programs go to lcm's persistent cache (``LCM_COMPILE_CACHE``, else
``$LCM_CACHE_DIR/xla``, else ``~/.cache/lcm/xla``, as ``lcm run`` does), so a second run mostly skips compiling.
The executed copy of each notebook, outputs included, is left in the test's ``tmp_path``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lcm.io.fetch import cache_dir

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))


@pytest.fixture
def kernel_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``python3`` kernel spec for ``sys.executable`` ahead of any installed one, and the compile cache."""
    pytest.importorskip("ipykernel", reason="ipykernel is not installed (pip install -e '.[test]')")
    from ipykernel.kernelspec import write_kernel_spec

    jupyter_path = tmp_path / "jupyter"
    write_kernel_spec(jupyter_path / "kernels" / "python3")
    monkeypatch.setenv(
        "JUPYTER_PATH", os.pathsep.join(filter(None, [str(jupyter_path), os.environ.get("JUPYTER_PATH")]))
    )
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", os.environ.get("LCM_COMPILE_CACHE", str(cache_dir() / "xla")))
        monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
        monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")


def test_there_are_notebooks() -> None:
    assert NOTEBOOKS, f"no notebooks in {ROOT / 'colab'}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path: Path, kernel_env: None, tmp_path: Path, smollm2_gguf: Path) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(path, as_version=4)

    client = nbclient.NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    )
    try:
        client.execute()
    finally:
        nbformat.write(nb, tmp_path / path.name)
    errors = [
        f"cell {i}: {out.get('ename')}: {out.get('evalue')}"
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]
    assert not errors, "\n".join(errors)
