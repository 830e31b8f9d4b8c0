"""The Colab notebooks (`colab/*.ipynb`): structure checks, and each one executed top to bottom on CPU.

Execution uses `nbclient` with the `python3` kernel of the interpreter running pytest (ipykernel must be
installed in it), a fresh temporary working directory per notebook (so nothing lands in the repo), this
checkout first on `PYTHONPATH`, and `JAX_PLATFORMS=cpu` (the notebooks pick their tiny CPU settings from
`jax.default_backend()`). Any cell error fails the test with the cell's traceback.
"""

import glob
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "colab", "*.ipynb")))
CELL_TIMEOUT_S = 300
EXPECTED = {"01_quickstart.ipynb", "02_sft_lora.ipynb", "03_reward_model_ppo.ipynb", "04_data_pipeline.ipynb"}


def _load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _code(nb):
    return ["".join(c["source"]) if isinstance(c["source"], list) else c["source"]
            for c in nb["cells"] if c["cell_type"] == "code"]


def test_all_notebooks_present():
    assert EXPECTED <= {os.path.basename(p) for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_structure(path):
    """nbformat 4, outputs cleared, a guarded install cell, settings chosen by backend, and asserts."""
    nb = _load(path)
    assert nb["nbformat"] == 4
    nbformat = pytest.importorskip("nbformat")
    nbformat.validate(nbformat.reads(json.dumps(nb), as_version=4))
    code = _code(nb)
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [] and cell.get("execution_count") is None, "outputs not cleared"
    install = code[0]
    assert "find_spec(\"internlm2_jax\") is None" in install and "!pip install" in install
    assert "jax.default_backend()" in code[1]
    assert sum(src.count("assert ") for src in code) >= 2


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_executes(path, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")

    nb = nbformat.read(path, as_version=4)
    # First check that the kernel runs this interpreter (the venv) and imports this checkout.
    check = nbformat.v4.new_code_cell(
        "import sys, internlm2_jax\n"
        f"assert sys.prefix == {sys.prefix!r}, sys.prefix\n"
        f"assert internlm2_jax.__file__.startswith({ROOT!r}), internlm2_jax.__file__")
    nb.cells.insert(0, check)
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    before = set(os.listdir(os.path.dirname(path)))
    client.execute(env=env)  # raises CellExecutionError (with the traceback) on the first failing cell
    assert set(os.listdir(os.path.dirname(path))) == before, "the notebook wrote next to itself, not into its cwd"
