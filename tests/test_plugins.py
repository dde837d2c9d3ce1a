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
everything = "toy_plugin:Everything"
boolmask = "toy_plugin:BoolMask"
repeats = "toy_plugin:Repeats"
outofrange = "toy_plugin:OutOfRange"
headname = "toy_plugin:HeadName"
nanscores = "toy_plugin:NaNScores"
random = "toy_plugin:LayerNormOnly"
stepsalias = "toy_plugin:StepsAlias"
unfreezes = "toy_plugin:Unfreezes"
leaveshook = "toy_plugin:LeavesHook"

[project.entry-points."peftbench.metrics"]
balanced_accuracy = "toy_plugin:BALANCED_ACCURACY"
not_a_metric = "toy_plugin:LayerNormOnly"

[project.entry-points."peftbench.preprocessors"]
lowercase = "toy_plugin:LOWERCASE"
"""

MODULE = '''
"""A toy method: train LayerNorm weights only; a toy metric and a toy preprocessor."""
from peftbench.api import Selection, Selector, pretrained_parameters
from peftbench.data.metrics import Metric
from peftbench.data.preprocessors import Preprocessor

BALANCED_ACCURACY = Metric("balanced_accuracy", lambda p, y: float(__import__("sklearn.metrics").metrics.balanced_accuracy_score(y, p)),
                           ("classification",), "balanced accuracy")
LOWERCASE = Preprocessor("lowercase", lambda row: {**row, "text": row["text"].lower()}, "lower-cases `text`")


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


class Unfreezes(LayerNormOnly):
    """Selects within its budget, then apply() unfreezes the whole model."""

    def apply(self, model, selection):
        model = super().apply(model, selection)
        for p in model.parameters():
            p.requires_grad_(True)
        return model


class LeavesHook(LayerNormOnly):
    """score() leaves a forward hook on the model (it would act in every later forward)."""

    def score(self, model, data):
        model.register_forward_hook(lambda module, args, out: out)
        return None


class Everything(Selector):
    """Ignores its budget: every tensor trains."""

    def select(self, model, scores, budget, generator):
        return Selection(full=set(pretrained_parameters(model)))


class _OneTensor(Selector):
    def select(self, model, scores, budget, generator):
        import torch

        name, param = next(iter(pretrained_parameters(model).items()))
        return Selection(partial={name: self.indices(torch, param.numel(), budget)})


class BoolMask(_OneTensor):
    def indices(self, torch, n, budget):
        return torch.arange(n) < min(budget, n)  # a mask where indices belong


class Repeats(_OneTensor):
    def indices(self, torch, n, budget):
        return torch.zeros(min(budget, n), dtype=torch.long)  # one entry, counted budget times


class OutOfRange(_OneTensor):
    def indices(self, torch, n, budget):
        return torch.tensor([0, n])


class StepsAlias(Selector):
    """Stores its argument under another name: get_params cannot see it."""

    def __init__(self, steps: int = 3):
        self.n_steps = steps

    def score(self, model, data):
        import torch

        return {n: torch.full_like(p, float(self.n_steps)) for n, p in pretrained_parameters(model).items()}

    def select(self, model, scores, budget, generator):
        from peftbench.api import top_k

        return top_k(scores, budget, "global", generator)


class HeadName(Selector):
    def select(self, model, scores, budget, generator):
        return Selection(full={"classifier.bias"})


class NaNScores(Selector):
    needs_data = False

    def score(self, model, data):
        import torch

        return {n: torch.full_like(p, float("nan")) for n, p in pretrained_parameters(model).items()}

    def select(self, model, scores, budget, generator):
        from peftbench.api import top_k

        return top_k(scores, budget, "global", generator)
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


@pytest.mark.slow
def test_plugin_is_listed_and_broken_plugin_reported(plugin_site):
    proc = _cli(plugin_site, "methods")
    assert proc.returncode == 0, proc.stderr
    lines = {l.split()[0]: l for l in proc.stdout.splitlines()}
    assert "peftbench-toy-plugin" in lines["layernorm"] and "toy plugin" in lines["layernorm"]
    assert "failed to load" in lines["broken"] and "needs a missing library" in lines["broken"]
    assert "random" in lines and "bitfit" in lines  # the others still work


@pytest.mark.slow
def test_a_metric_and_a_preprocessor_from_a_plugin(plugin_site):
    """A metric and a preprocessor are one record and one entry-point line each; one that is not
    its table's record fails alone, by name."""
    script = "; ".join([
        "import numpy as np", "from peftbench.data import metrics, preprocessors",
        "print(metrics.compute(['accuracy', 'balanced_accuracy'], ['balanced_accuracy'], np.array([1, 1, 1, 0]), np.array([1, 1, 0, 0]))['main'])",
        "print(metrics.metric_label(['accuracy', 'balanced_accuracy']))",
        "print(preprocessors.REGISTRY.get('lowercase').apply({'text': 'ABC'})['text'])",
        "print('not_a_metric' in metrics.REGISTRY, 'accuracy' in metrics.REGISTRY)"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_site), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["0.75", "(accuracy + balanced accuracy)/2", "abc", "False True"]
    proc = subprocess.run([sys.executable, "-c", "from peftbench.data import metrics; metrics.REGISTRY.get('not_a_metric')"],
                          capture_output=True, text=True, env=env)
    assert "metric 'not_a_metric': toy_plugin:LayerNormOnly in package peftbench-toy-plugin is not a Metric" in proc.stderr


@pytest.mark.slow
def test_plugin_runs_through_the_cli(plugin_site, tiny_model_dir, tmp_path):
    proc = _cli(plugin_site, "run", "--method", "layernorm", "--task", "rte", "--model",
                tiny_model_dir, "--limit", "16", "--epochs", "1", "--quiet",
                "--output-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    # 2 layers x 2 LayerNorms + embeddings LayerNorm, hidden 32
    assert "| layernorm | rte" in proc.stdout and " 160 " in proc.stdout


@pytest.mark.slow
def test_broken_plugin_fails_by_name(plugin_site):
    proc = _cli(plugin_site, "run", "--method", "broken", "--task", "rte")
    assert proc.returncode == 2
    assert "method 'broken' from package peftbench-toy-plugin failed to load" in proc.stderr


@pytest.mark.slow
def test_check_method_passes_a_good_plugin_and_fails_one_that_moves_weights(plugin_site):
    good = _cli(plugin_site, "check-method", "layernorm")
    assert good.returncode == 0, good.stdout + good.stderr
    assert "layernorm: 7 of 7 checks passed" in good.stdout
    bad = _cli(plugin_site, "check-method", "mover")
    assert bad.returncode == 1
    assert re.search(r"^FAIL\s+score_leaves_model_unchanged\s+method 'mover' changed the model in score\(\)",
                     bad.stdout, re.M)


@pytest.mark.slow
def test_the_runner_refuses_a_plugin_whose_score_moves_weights(plugin_site, tiny_model_dir, tmp_path):
    proc = _cli(plugin_site, "run", "--method", "mover", "--task", "rte", "--model", tiny_model_dir,
                "--limit", "8", "--epochs", "1", "--quiet", "--output-dir", str(tmp_path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "method 'mover' changed the model in score()" in proc.stderr


HOSTILE_SELECTIONS = {  # method: (the check-method check that fails, the words both say)
    "everything": ("select_within_budget", "entries selected, over the budget of"),
    "boolmask": ("select_within_budget", "is a 1-D torch.bool tensor: give a 1-D integer tensor of flat indices"),
    "repeats": ("select_within_budget", "repeats indices"),
    "outofrange": ("select_within_budget", "outside 0.."),
    "headname": ("select_within_budget", "are not pre-trained encoder parameters, e.g. 'classifier.bias'"),
    "nanscores": ("select_within_budget", "NaN value(s)"),
    "unfreezes": ("training_keeps_frozen_entries", "entries trainable after training"),
    "leaveshook": ("score_leaves_model_unchanged", "left 1 hook(s) on the model in score()"),
}


# each hostile method through `peftbench run` and `peftbench check-method`, as the CLI's own
# `main` in one subprocess (the plugin installed on its path): one torch import for all six
_HOSTILE_SCRIPT = """
import contextlib, io, json, sys, traceback
from peftbench.cli.main import main
model, folder = sys.argv[1], sys.argv[2]
out = {}
for method in json.loads(sys.argv[3]):
    err, std = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            run = main(["run", "--method", method, "--task", "rte", "--model", model, "--limit", "8",
                        "--epochs", "1", "--budget", "0.01", "--quiet", "--output-dir", f"{folder}/{method}"])
        except BaseException:
            run = -1
            traceback.print_exc()
    with contextlib.redirect_stdout(std):
        check = main(["check-method", method])
    out[method] = {"run": run, "stderr": err.getvalue(), "check": check, "stdout": std.getvalue()}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def hostile_outcomes(plugin_site, tiny_model_dir, tmp_path_factory):
    import json

    folder = tmp_path_factory.mktemp("hostile-runs")
    proc = _cli_script(plugin_site, _HOSTILE_SCRIPT, tiny_model_dir, str(folder), json.dumps(sorted(HOSTILE_SELECTIONS)))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), folder


def _cli_script(site: Path, script: str, *args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(HOSTILE_SELECTIONS))
def test_the_runner_and_check_method_refuse_the_same_bad_selections(hostile_outcomes, method):
    """One validator for both: `run` refuses with one line naming the method and the rule
    (no result written), and `check-method` fails the matching check with the same words."""
    outcomes, folder = hostile_outcomes
    got = outcomes[method]
    check, words = HOSTILE_SELECTIONS[method]
    assert got["run"] == 2 and "Traceback" not in got["stderr"], got["stderr"]
    line, = got["stderr"].strip().splitlines()
    assert f"method {method!r}" in line and words in line
    assert not list((folder / method).glob("*/seed-*/result.json"))  # no result recorded
    assert got["check"] == 1
    assert re.search(rf"^FAIL\s+{check}\s+.*" + re.escape(words), got["stdout"], re.M), got["stdout"]


@pytest.mark.slow
def test_a_name_registered_twice_is_an_error_naming_both_packages(plugin_site):
    proc = _cli(plugin_site, "run", "--method", "random", "--task", "rte")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "registered more than once" in proc.stderr
    assert "peftbench-toy-plugin" in proc.stderr and "in package peftbench;" in proc.stderr


def _sweep_spec(tmp_path, model, steps: int, name: str = "alias"):
    import yaml

    path = tmp_path / f"{name}-{steps}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "model": model, "tasks": ["rte"], "methods": {"stepsalias": {"steps": steps}},
        "budgets": [0.01], "seeds": 1, "limit": 8, "train": {"epochs": 1},
        "output_dir": str(tmp_path / "out")}))
    return path


@pytest.mark.slow
def test_a_parameter_stored_under_another_name_still_keys_the_score_cache(plugin_site, tiny_model_dir, tmp_path):
    """The cache key is the validated arguments, not attributes read back: steps 3 -> 30 scores
    again (it re-used the steps=3 scores before); check-method names the broken rule."""
    import json

    for steps in (3, 30):
        proc = _cli(plugin_site, "sweep", str(_sweep_spec(tmp_path, tiny_model_dir, steps, f"alias{steps}")))
        assert proc.returncode == 0, proc.stderr
    selections = sorted((tmp_path / "out" / "runs").glob("*/seed-0/selection.json"),
                        key=lambda p: p.stat().st_mtime)
    assert [json.loads(p.read_text())["scores_from_cache"] for p in selections] == [False, False]
    assert [json.loads(p.read_text())["params"] for p in selections] == [{"steps": 3}, {"steps": 30}]
    check = _cli(plugin_site, "check-method", "stepsalias")
    assert re.search(r"^FAIL\s+init_stores_params\s+__init__ argument 'steps' is not stored as self.steps",
                     check.stdout, re.M), check.stdout


@pytest.mark.slow
def test_a_plugins_code_identity_covers_its_helper_modules(plugin_site):
    """An edit to another module of the plugin's distribution is a new identity (the cache and
    the cells see it), not only an edit to the class's own file."""
    probe = "from peftbench.training.identity import code_identity; print(code_identity('layernorm')['source'])"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_site), os.environ.get("PYTHONPATH", "")])}
    before = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    helper = plugin_site / "toy_plugin_broken.py"
    helper.write_text(helper.read_text() + "# an edit to a helper module\n")
    after = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    assert before.strip() and before != after


@pytest.mark.slow
def test_status_and_report_say_which_cells_a_code_edit_left_stale(plugin_site, tiny_model_dir, tmp_path):
    spec = _sweep_spec(tmp_path, tiny_model_dir, 3, name="stale")
    assert _cli(plugin_site, "sweep", str(spec)).returncode == 0
    module = plugin_site / "toy_plugin.py"
    module.write_text(module.read_text() + "# a one-line comment\n")
    status = _cli(plugin_site, "status", str(spec))
    assert status.returncode == 0, status.stderr
    line = status.stdout.strip()
    assert "0/1 cells done" in line and "ETA" not in line
    assert "1 stale (method code changed: " in line and "toy_plugin.py" in line
    report = _cli(plugin_site, "report", str(spec))
    assert report.returncode == 2 and "no finished trial" in report.stderr
    assert "1 stale: method code changed: " in report.stderr


def test_a_plugin_name_that_is_not_file_safe_fails_by_name(monkeypatch):
    """A method's name becomes part of its run folder's name: `../x` would place runs outside
    --output-dir. Such an entry point is reported as broken, never loaded or run."""
    from importlib.metadata import EntryPoint

    from peftbench.contract import registry
    from peftbench.core.errors import UsageError

    real = registry.entry_points
    bad = [EntryPoint("../escape", "peftbench.methods.random_mask:RandomMask", registry.GROUP),
           EntryPoint("a/b", "peftbench.methods.random_mask:RandomMask", registry.GROUP)]
    monkeypatch.setattr(registry, "entry_points", lambda group: [*real(group=group), *bad])
    listed = registry.methods()
    assert "not file-safe" in listed["../escape"].error and "not file-safe" in listed["a/b"].error
    assert listed["random"].error is None
    with pytest.raises(UsageError, match="not file-safe"):
        registry.get("../escape")


@pytest.mark.slow
def test_an_installed_plugin_joins_a_committed_board_in_one_command(plugin_site, tiny_model_dir, tmp_path):
    """The method author's last step: `leaderboard join BOARD METHOD` puts an installed plugin's
    row on a board that was built and committed without it; only its cells train."""
    import json

    import pandas as pd
    import yaml

    board = tmp_path / "boards" / "tiny"
    board.mkdir(parents=True)
    (board / "spec.yaml").write_text(yaml.safe_dump({
        "name": "tiny", "model": tiny_model_dir, "tasks": ["rte"], "methods": {"magpruning": {}}, "budgets": [0.01],
        "seeds": 1, "limit": 16, "train": {"epochs": 1, "max_steps": 2}, "output_dir": str(tmp_path / "sweep")}))
    env_board = {"PEFTBENCH_LEADERBOARDS": str(tmp_path / "boards")}
    os.environ.update(env_board)
    try:
        assert _cli(plugin_site, "leaderboard", "run", "tiny").returncode == 0
        joined = _cli(plugin_site, "leaderboard", "join", "tiny", "layernorm")
    finally:
        os.environ.pop("PEFTBENCH_LEADERBOARDS")
    assert joined.returncode == 0, joined.stderr[-2000:]
    assert "joining layernorm to tiny" in joined.stdout and "joined layernorm to tiny in" in joined.stdout
    cells = sorted(json.loads(p.read_text())["cell"] for p in (board / "runs").glob("*/cell.json"))
    assert cells == ["rte/layernorm/b0.01/s0", "rte/magpruning/b0.01/s0"]  # the toy plugin uses the budget
    assert set(pd.read_csv(board / "results.csv").method) == {"magpruning", "layernorm"}


def test_the_registry_sees_a_distribution_installed_while_it_runs(tmp_path, monkeypatch):
    """The registry keeps the entry points it read (parsing every installed distribution's
    metadata on every lookup took a quarter of a board's report), but an install on the import path,
    or a new folder on it, shows at the next lookup."""
    from peftbench.contract import registry

    def install(site: Path, dist: str, name: str, stamp: int) -> None:
        info = site / f"{dist}-0.0.1.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.0.1\n")
        (info / "entry_points.txt").write_text(f"[peftbench.methods]\n{name} = {dist}_mod:Nothing\n")
        os.utime(site, ns=(stamp, stamp))  # an install changes its folder's mtime; say so exactly

    site = tmp_path / "site"
    install(site, "first_dist", "first-method", 10**18)
    assert "first-method" not in registry.methods()
    monkeypatch.syspath_prepend(str(site))
    assert "first-method" in registry.methods()
    install(site, "second_dist", "second-method", 10**18 + 10**9)
    listed = registry.methods()
    assert {"first-method", "second-method"} <= set(listed) and listed["random"].error is None
