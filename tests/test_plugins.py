"""A third-party method is one module + one entry-point line, in a package of its own."""
import os
import re
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
mover = "toy_plugin:MovesWeights"
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


class MovesWeights(LayerNormOnly):
    """LT-SFT written wrong: a scoring fine-tune that forgets to restore theta0."""

    description = "moves the weights in score (broken on purpose)"

    def score(self, model, data):
        import torch

        with torch.no_grad():
            for p in pretrained_parameters(model).values():
                p.add_(0.01)
        return None
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


def test_check_method_passes_a_good_plugin_and_fails_one_that_moves_weights(plugin_site):
    good = _cli(plugin_site, "check-method", "layernorm")
    assert good.returncode == 0, good.stdout + good.stderr
    assert "layernorm: 6 of 6 checks passed" in good.stdout
    bad = _cli(plugin_site, "check-method", "mover")
    assert bad.returncode == 1
    assert re.search(r"^FAIL\s+score_leaves_model_unchanged\s+score\(\) changed", bad.stdout, re.M)


def test_the_runner_refuses_a_plugin_whose_score_moves_weights(plugin_site, tiny_model_dir, tmp_path):
    proc = _cli(plugin_site, "run", "--method", "mover", "--task", "rte", "--model", tiny_model_dir,
                "--limit", "8", "--epochs", "1", "--quiet", "--output-dir", str(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "method 'mover' changed the model in score()" in proc.stderr
