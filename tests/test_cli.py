"""The command line: listings, an end-to-end run, and every bad-input case (exit 2, one line)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import copy_task

from peftbench.analysis import checks
from peftbench.analysis import frame as analysis_frame
from peftbench.cli.main import main
from peftbench.rendering import interactive


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_methods_lists_builtins_with_package(capsys):
    code, out, _ = run_cli(capsys, "methods")
    assert code == 0
    for name in ("fulltuning", "random", "bitfit", "magpruning"):
        line = next(l for l in out.splitlines() if l.startswith(name + " "))
        assert "peftbench" in line and len(line.split()) > 3


def test_tasks_lists_the_seven(capsys):
    code, out, _ = run_cli(capsys, "tasks")
    assert code == 0
    assert {l.split()[0] for l in out.splitlines()} >= {"cola", "stsb", "mrpc", "rte", "cb", "copa", "wsc"}


@pytest.mark.slow
def test_run_end_to_end_on_real_rte(capsys, tiny_model_dir, tmp_path):
    code, out, err = run_cli(capsys, "run", "--method", "random", "--task", "rte", "--budget",
                             "0.01", "--seeds", "2", "--model", tiny_model_dir, "--epochs", "1",
                             "--limit", "40", "--output-dir", str(tmp_path), "--quiet")
    assert code == 0, err
    run_dir = Path(out.strip().splitlines()[-1].split(": ", 1)[1])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["trainable"] == int(0.01 * summary["pretrained_entries"])
    assert f"{summary['trainable']:,}" in out and "test accuracy" in out
    for seed in (0, 1):
        for name in ("selection.json", "metrics.jsonl", "result.json"):
            assert (run_dir / f"seed-{seed}" / name).is_file()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["method"] == "random" and config["seeds"] == [0, 1]
    # cost beside accuracy: peak memory (scoring, training), steps per second, training time
    result = json.loads((run_dir / "seed-0" / "result.json").read_text())
    peak = result["peak_memory"]
    assert peak["kind"] == "rss" and peak["training_bytes"] > 50 * 2**20 and peak["scoring_bytes"] > 0
    assert result["steps_per_s"] > 0 and result["train_time_s"] > 0
    seeds = [json.loads((run_dir / f"seed-{i}" / "result.json").read_text())["peak_memory"] for i in (0, 1)]
    assert summary["peak_memory_mb"] == max(max(p["scoring_bytes"], p["training_bytes"]) for p in seeds) / 2**20
    assert "steps/s" in out and "peak MiB" in out

    frame = analysis_frame.load_runs([run_dir])
    assert frame.peak_memory_mb.gt(50).all() and frame.steps_per_s.gt(0).all()
    assert checks.cost_table(frame).loc["random", "peak_memory_mb"] == frame.peak_memory_mb.max()
    hover = interactive.pareto_figure(frame).data[0]
    assert "peak memory" in hover.hovertemplate and hover.customdata[0][5] == frame.peak_memory_mb.max()


def test_peak_memory_is_reset_between_stretches():
    """One sweep process runs many cells: each cell's peak must be its own, not the process's."""
    import torch

    from peftbench.training import memory

    big = torch.ones(64 * 2**20)  # 256 MiB, touched
    spike = memory.peak("cpu")["bytes"]
    del big
    if not memory.reset_peak("cpu"):
        pytest.skip("this platform cannot reset the peak RSS (no writable /proc/self/clear_refs)")
    small = torch.ones(2**20)
    after = memory.peak("cpu", True)
    assert small.sum() > 0 and after["kind"] == "rss" and after["since_reset"]
    assert after["bytes"] < spike - 200 * 2**20


def _one_line_error(capsys, *argv):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("peftbench: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _run_args(model, *extra):
    return ["run", "--method", "random", "--task", "rte", "--model", model, "--limit", "8",
            "--epochs", "1", "--quiet", *extra]


def test_unknown_method(capsys):
    msg = _one_line_error(capsys, "run", "--method", "randon", "--task", "rte")
    assert "unknown method 'randon'" in msg and "did you mean 'random'" in msg and "bitfit" in msg


def test_unknown_task(capsys):
    msg = _one_line_error(capsys, "run", "--method", "random", "--task", "rtee")
    assert "unknown task 'rtee'" in msg and "cola" in msg


@pytest.mark.parametrize("budget", ["0", "1.5", "-0.2", "lots"])
def test_budget_out_of_range(capsys, tiny_model_dir, budget):
    msg = _one_line_error(capsys, *_run_args(tiny_model_dir, "--budget", budget))
    assert "(0, 1]" in msg


def test_budget_above_model_size(capsys, tiny_model_dir, tmp_path):
    msg = _one_line_error(capsys, *_run_args(tiny_model_dir, "--budget", "999999999",
                                             "--output-dir", str(tmp_path)))
    assert "above the model size" in msg and "pre-trained model has" in msg


def test_missing_data_file(capsys, tmp_path):
    path = Path(copy_task(tmp_path, "rte"))
    path.write_text(path.read_text().replace("val.jsonl", "nothere.jsonl"))
    msg = _one_line_error(capsys, "run", "--method", "random", "--task", str(path))
    assert "validation data file" in msg and "nothere.jsonl" in msg and "missing" in msg


@pytest.mark.parametrize("model", ["/nonexistent/model", "./not/a/model/dir"])
def test_unreadable_model_path(capsys, model):
    msg = _one_line_error(capsys, *_run_args(model))
    assert "does not exist" in msg


def test_model_folder_without_config(capsys, tmp_path):
    msg = _one_line_error(capsys, *_run_args(str(tmp_path)))
    assert "no config.json" in msg


def test_malformed_yaml_syntax_names_file_and_line(capsys, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: bad\nkind: classification\ntext: [premise, hypothesis\nlabels: [a]\n")
    msg = _one_line_error(capsys, "run", "--method", "random", "--task", str(path))
    assert f"{path}:" in msg and "malformed task YAML" in msg


def test_malformed_yaml_schema_names_file_and_line(capsys, tmp_path):
    path = Path(copy_task(tmp_path, "rte"))
    path.write_text(path.read_text().replace("kind: classification", "kind: ranking"))
    line = next(i for i, l in enumerate(path.read_text().splitlines(), 1) if l.startswith("kind"))
    msg = _one_line_error(capsys, "run", "--method", "random", "--task", str(path))
    assert f"{path}:{line}:" in msg and "allowed classification, regression, multiple_choice" in msg


def test_unknown_key_and_metric(capsys, tmp_path):
    path = Path(copy_task(tmp_path, "rte"))
    path.write_text(path.read_text().replace("metrics: [accuracy]", "metrics: [bleu]"))
    assert "metric 'bleu' is unknown" in _one_line_error(capsys, "run", "--method", "random",
                                                         "--task", str(path))
    path.write_text(path.read_text() + "colour: blue\n")
    assert "unknown key 'colour'" in _one_line_error(capsys, "run", "--method", "random",
                                                     "--task", str(path))


def test_bad_method_parameter(capsys):
    msg = _one_line_error(capsys, "run", "--method", "magpruning", "--task", "rte",
                          "--param", "scope=rows")
    assert "scope 'rows' is unknown: allowed tensor, global" in msg


@pytest.mark.slow
def test_process_exit_code_is_2_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "peftbench", "run", "--method", "nope",
                           "--task", "rte"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("peftbench: error: unknown method") and "Traceback" not in proc.stderr


def test_help_shows_every_default_and_no_stray_markup(capsys):
    from peftbench.cli.main import main

    assert main(["--help"]) == 0
    top = capsys.readouterr().out
    assert "peftbench command line" in top and "`" not in top.split("\n\n")[1]
    assert main(["run", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for option, default in (("--epochs", "3"), ("--batch-size", "16"), ("--lr", "0.0001"),
                            ("--max-length", "128"), ("--budget", "0.005"), ("--output-dir", "runs")):
        assert f"(default: {default})" in text.split(option, 2)[-1].split("--", 1)[0], option
    assert "--max-steps" in text and "epochs x batches" in text


def _cli(*args, env=None, **kwargs):
    import subprocess
    import sys as _sys

    return subprocess.run([_sys.executable, "-m", "peftbench", *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, timeout=300, **kwargs)


@pytest.mark.slow
def test_output_to_a_closed_pipe_is_silent_and_exits_0():
    import subprocess
    import sys as _sys

    proc = subprocess.Popen([_sys.executable, "-m", "peftbench", "leaderboard", "show", "quickstart-sst2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()  # `| head -1`: read one line, then the reader goes away
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0 and "Traceback" not in err and "Exception ignored" not in err, err


@pytest.mark.slow
@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full here")
def test_output_to_a_full_device_is_one_line_and_exit_1():
    import subprocess
    import sys as _sys

    with open("/dev/full", "w") as full:
        proc = subprocess.run([_sys.executable, "-m", "peftbench", "methods"], stdout=full,
                              stderr=subprocess.PIPE, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("peftbench: error: standard output failed (No space left on device)")


@pytest.mark.slow
def test_output_in_an_ascii_locale_escapes_what_it_cannot_encode():
    proc = _cli("leaderboard", "show", "quickstart-sst2", env={"PYTHONIOENCODING": "ascii"})
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-500:]
    assert "\\xb1" in proc.stdout  # the ± of mean ± std, escaped


@pytest.mark.slow
def test_plot_out_refuses_a_folder_of_the_users(tmp_path, capsys, tiny_model_dir):
    """`plot pareto --out DIR` over a folder holding the user's own pareto.png: refused before
    any work, the file untouched; an empty or new folder is taken and marked."""
    import yaml

    from peftbench.cli.main import main

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "p", "model": tiny_model_dir, "tasks": ["rte"], "methods": {"random": {}},
                                    "budgets": [0.01], "seeds": 1, "limit": 16, "train": {"epochs": 1, "max_steps": 1},
                                    "output_dir": str(tmp_path / "out")}))
    assert main(["sweep", str(spec)]) == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "pareto.png").write_bytes(b"my figure")
    (mine / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(["plot", "pareto", str(spec), "--out", str(mine)]) == 2
    assert "holds files peftbench did not write" in capsys.readouterr().err
    assert (mine / "pareto.png").read_bytes() == b"my figure"
    assert main(["plot", "pareto", str(spec), "--out", str(tmp_path / "figures")]) == 0
    assert (tmp_path / "figures" / "pareto.png").is_file() and (tmp_path / "figures" / ".peftbench").is_file()
    assert main(["plot", "pareto", str(spec), "--out", str(tmp_path / "figures")]) == 0  # ours: taken again
