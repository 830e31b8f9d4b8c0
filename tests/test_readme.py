"""The README's commands name real modules and files, and its Python snippet runs as written."""

import importlib.util
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(__file__))
README = open(os.path.join(ROOT, "README.md")).read()


def test_first_lines_are_install_and_test_commands():
    block = re.search(r"```bash\n(.*?)```", README, re.S).group(1).strip().splitlines()
    assert "pip install -e ." in block[0] and "experiments.pretrain" in block[0]
    assert "pytest" in block[1]
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    test_cmd = block[1].split("&&")[-1].strip()
    assert test_cmd.startswith('python -m pytest -m "not slow"') and test_cmd in ci


@pytest.mark.parametrize("module", sorted(set(re.findall(r"python -m (experiments\.\w+)", README))))
def test_entry_point_modules_exist(module):
    assert importlib.util.find_spec(module) is not None, module


@pytest.mark.parametrize("path", sorted(set(re.findall(r"(experiments/configs/[\w/]+\.gin)", README))))
def test_referenced_configs_exist(path):
    assert os.path.exists(os.path.join(ROOT, path)), path


def test_python_snippet_runs(tmp_path, monkeypatch):
    code = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    code = code.replace("/tmp/", str(tmp_path) + "/")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["logits"].shape == (1, 4, 512) and scope["next_logits"].shape == (1, 512)
    # save_hf → load_hf is an identity: same dtypes, same logits.
    ij, tokens = scope["ij"], scope["tokens"]
    assert scope["config2"].compute_dtype == scope["config"].compute_dtype
    assert (ij.forward(scope["config2"], scope["params2"], tokens) == scope["logits"]).all()
