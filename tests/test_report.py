"""`actsparse report` on a tiny sweep: files, tables, and report.html rendered in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from tiny import tiny_lm, tiny_task

from actsparse import cli
from actsparse.report import render, tables
from actsparse.study.sweep import SweepConfig, run_sweep

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "run"
    model, tokenizer = tiny_lm()
    config = SweepConfig(
        model="tiny",
        targets=["input", "intermediate"],
        rules=["top_p", "max_p"],
        values=[0.9, 0.5],
        tasks=[tiny_task("mc", 12), tiny_task("mc2", 12, seed=2)],
        limit=None,
        out=out,
        resamples=50,
    )
    run_sweep(config, model, tokenizer, show_progress=False)
    assert cli.main(["report", str(out), "--resamples", "100"]) == 0
    return out


def test_report_files(run_dir: Path) -> None:
    names = {p.name for p in run_dir.iterdir()}
    expected = {
        "report.md",
        "report.html",
        "summary.json",
        "critical_sparsity.png",
        "performance.png",
        "heatmap_input.png",
        "heatmap_intermediate.png",
        "critical_per_task.png",
        "top_p_vs_max_p.png",
        "heatmap_tasks_input.png",  # per-layer sparsity of each task alone (report.structure)
        "heatmap_tasks_intermediate.png",
    }
    assert expected <= names
    for png in run_dir.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (run_dir / "report.md").read_text()
    headings = [line for line in md.splitlines() if line.startswith("## ")]
    assert headings[:3] == ["## Critical sparsity", "## Comparisons", "## Where the sparsity lies, per layer"]
    assert {"## Per task", "## Every point", "## Method", "## Provenance"} <= set(headings)
    assert md.index("(critical_sparsity.png)") < md.index("## Comparisons")  # the paper's figure under the table
    assert "(performance.png)" in md and "split used" in md and "### Dense scores" in md
    assert "(heatmap_tasks_input.png)" in md
    assert "low-noise" not in md and "gold" not in md  # the proxies keep their own names
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["bootstrap"]["resamples"] == 100
    assert set(summary["critical_sparsity"]) == {
        "input/top_p",
        "input/max_p",
        "intermediate/top_p",
        "intermediate/max_p",
    }


def test_tables_mark_lower_bounds() -> None:
    summary = {
        "tasks": ["a"],
        "splits": {"a": "validation"},
        "metrics": {"a": "acc"},
        "n_docs": {"a": 10},
        "dense": {"a": 0.5},
        "critical_sparsity": {
            "input/top_p": {"value": 0.4, "grid_value": 0.4, "ci_low": 0.3, "ci_high": 0.4, "lower_bound": True}
        },
        "points": [],
    }
    rows = tables(summary)["Critical sparsity"][1]
    assert rows == [["input/top_p", "≥ 40.0 % [30.0 %, 40.0 %]", "40.0 %", "–", "no: a lower bound"]]
    md, page = render(summary, [])
    assert "≥ 40.0 %" in md and "<table>" in page


CHECK = """<script>
window.__errors = [];
window.addEventListener("error", e => window.__errors.push(String(e.message || (e.target && e.target.src) || e)), true);
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 100 && i.naturalHeight > 100).length;
  const pre = document.createElement("pre");
  pre.id = "check";
  pre.textContent = JSON.stringify({images: imgs.length, loaded: ok, errors: window.__errors});
  document.body.appendChild(pre);
});
</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_report_html_renders_in_headless_chromium(run_dir: Path, tmp_path: Path) -> None:
    page = (run_dir / "report.html").read_text()
    assert 'src="data:image/png;base64,' in page and 'src="http' not in page  # self-contained
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("<head>", "<head>" + CHECK, 1))
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=5000",
        "--enable-logging=stderr",
        "--v=0",
    ]
    shot = tmp_path / "shot.png"
    done = subprocess.run(
        [CHROMIUM, *flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=90, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    match = re.search(r'<pre id="check">(.*?)</pre>', done.stdout)
    assert match, done.stdout[-2000:]
    check = json.loads(match.group(1).replace("&quot;", '"'))
    assert check["errors"] == []
    assert check["images"] == len(list(run_dir.glob("*.png"))) == 8
    assert check["loaded"] == check["images"]
    assert "Uncaught" not in done.stderr
    subprocess.run(
        [CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1280,2000", (run_dir / "report.html").as_uri()],
        capture_output=True,
        timeout=90,
        check=True,
    )
    assert shot.stat().st_size > 20_000  # a rendered page with plots, not a blank one


def test_report_of_a_folder_without_results_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "500")
    assert cli.main(["report", str(tmp_path / "empty")]) == 2
    assert "results.sqlite does not exist" in capsys.readouterr().err
    assert not (tmp_path / "empty").exists()


FIRST_SCREEN = """<script>
window.addEventListener("load", () => {
  const table = document.querySelector("h2 + table");
  const figure = document.querySelector("figure img");
  const pre = document.createElement("pre");
  pre.id = "screen";
  pre.textContent = JSON.stringify({
    heading: document.querySelector("h2").textContent,
    table: table.getBoundingClientRect().bottom,
    figure: figure.getBoundingClientRect().bottom,
    alt: figure.alt,
    height: window.innerHeight,
  });
  document.body.appendChild(pre);
});
</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_report_first_screen_shows_the_headline_table_and_the_papers_figure(run_dir: Path, tmp_path: Path) -> None:
    """At 1280 × 900 the headline table and the paper's figure both end inside the first screen."""
    probe = tmp_path / "screen.html"
    probe.write_text((run_dir / "report.html").read_text().replace("<head>", "<head>" + FIRST_SCREEN, 1))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--window-size=1280,900"]
    flags += [f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    done = subprocess.run(
        [CHROMIUM, *flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=90, check=False
    )
    match = re.search(r'<pre id="screen">(.*?)</pre>', done.stdout)
    assert match, done.stderr[-2000:]
    screen = json.loads(match.group(1).replace("&quot;", '"'))
    assert screen["heading"] == "Critical sparsity"
    assert "paper's figure" in screen["alt"]
    assert 0 < screen["table"] < screen["figure"] <= 900, screen
    shot = tmp_path / "first_screen.png"
    subprocess.run(
        [CHROMIUM, *flags, f"--screenshot={shot}", (run_dir / "report.html").as_uri()], timeout=90, check=True
    )
    assert shot.stat().st_size > 20_000
