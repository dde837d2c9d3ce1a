"""The documentation site builds offline with no warning (`mkdocs build --strict`), and its
generated reference holds what the code holds."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_docs_site_builds_strict_and_its_reference_is_generated(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    site = tmp_path / "site"
    cli = (site / "reference" / "cli.html").read_text()
    for command in ("run", "sweep", "leaderboard", "bench", "check-method"):
        assert f"peftbench {command}" in cli, command
    from peftbench.contract import registry

    methods = (site / "reference" / "methods.html").read_text()
    assert all(name in methods for name in registry.methods())
    assert "eval_order" in (site / "reference" / "schemas.html").read_text()
    assert "scoring_session" in (site / "reference" / "api.html").read_text()
    assert not (site / "hooks.py").exists()


def test_the_readme_stays_a_front_page():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150
