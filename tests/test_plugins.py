"""A third-party method is one module + one entry-point line, in a package of its own."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

PYPROJECT = """
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "peftbench-toy-plugin"
version = "0.0.1"

[tool.setuptools]
py-modules = ["toy_plugin", "toy_plugin_broken"]

[project.entry-points."peftbench.methods"]
layernorm = "toy_plugin:LayerNormOnly"
broken = "toy_plugin_broken:Nothing"
"""

MODULE = '''
"""A toy method: train LayerNorm weights only."""
from peftbench import Selection, Selector
from peftbench.models import pretrained_parameters


class LayerNormOnly(Selector):
    description = "LayerNorm weights only (toy plugin)"

    def select(self, model, scores, budget, generator):
        return Selection(full={n for n in pretrained_parameters(model)
                               if "LayerNorm.weight" in n})
'''


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    src = tmp_path_factory.mktemp("plugin-src")
    (src / "pyproject.toml").write_text(PYPROJECT)
    (src / "toy_plugin.py").write_text(MODULE)
    (src / "toy_plugin_broken.py").write_text("raise ImportError('needs a missing library')\n")
    site = tmp_path_factory.mktemp("plugin-site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--no-index", "--target", str(site), str(src)],
                   check=True)
    return site


def _cli(site: Path, *args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "peftbench", *args], capture_output=True,
                          text=True, env=env)


def test_plugin_is_listed_and_broken_plugin_reported(plugin_site):
    proc = _cli(plugin_site, "methods")
    assert proc.returncode == 0, proc.stderr
    lines = {l.split()[0]: l for l in proc.stdout.splitlines()}
    assert "peftbench-toy-plugin" in lines["layernorm"] and "toy plugin" in lines["layernorm"]
    assert "failed to load" in lines["broken"] and "needs a missing library" in lines["broken"]
    assert "random" in lines and "bitfit" in lines  # the others still work


def test_plugin_runs_through_the_cli(plugin_site, tiny_model_dir, tmp_path):
    proc = _cli(plugin_site, "run", "--method", "layernorm", "--task", "rte", "--model",
                tiny_model_dir, "--limit", "16", "--epochs", "1", "--quiet",
                "--output-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    # 2 layers x 2 LayerNorms + embeddings LayerNorm, hidden 32
    assert "| layernorm | rte" in proc.stdout and " 160 " in proc.stdout


def test_broken_plugin_fails_by_name(plugin_site):
    proc = _cli(plugin_site, "run", "--method", "broken", "--task", "rte")
    assert proc.returncode == 2
    assert "method 'broken' from package peftbench-toy-plugin failed to load" in proc.stderr
