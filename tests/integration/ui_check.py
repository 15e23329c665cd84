"""The MLflow UI of a finished study in a real browser: Debian's headless Chromium driven by playwright.

Used by the integration test on a finished tiny study; screenshots go to ``$STUDY_UI_SHOTS`` (default: the
test's folder). Needs ``/usr/bin/chromium`` (``apt-get install chromium``; `.ci/run` installs it).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import _service_pids, study_cmd

PLACEHOLDER = 'metrics.rmse < 1 and params.model = "tree"'  # the runs page's search box (MLflow 3.17)
PLUS = 'button:has(path[d^="M7.25 7.25V4.5"])'  # a collapsed parent run's expander


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("no chromium on this machine (apt-get install chromium): the MLflow UI browser check needs it")
    pytest.importorskip("playwright.sync_api")
    return exe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(storage: Path, name: str, cwd: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """`study ui` in its own process group; returns it and the URL it prints once the server answers."""
    port = free_port()
    fh = open(log, "w")  # noqa: SIM115
    proc = subprocess.Popen(study_cmd("ui", name, "--storage", str(storage), "--port", str(port)), cwd=cwd,
                            stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **dict([_tag(port).split("=")])})
    deadline = time.time() + 240
    while time.time() < deadline:
        for line in log.read_text().splitlines():
            if line.startswith("MLflow UI for study") and "http://" in line:
                return proc, line.split(": ", 1)[1].split()[0]
        if proc.poll() is not None:
            pytest.fail(f"study ui exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"study ui printed no URL:\n{log.read_text()[-3000:]}")


def _tag(port: int) -> str:
    """What every process of one `study ui` carries in its environment (the test may run studies beside it)."""
    return f"IW_UI_CHECK={port}"


def kill_leaves_nothing(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """``sig`` to `study ui` (the command, not its group: SIGTERM runs its handler, SIGKILL none, and its
    watchdog then stops the server) ends it and everything it started."""
    tag = _tag(int(proc.args[proc.args.index("--port") + 1]))
    proc.send_signal(sig)
    proc.wait(timeout=60)
    deadline = time.time() + 30
    left = {}
    while time.time() < deadline:
        left = {p: c for p, c in _service_pids(tag).items() if p != proc.pid}
        if not left:
            return
        time.sleep(0.5)
    pytest.fail(f"study ui left processes behind after {signal.Signals(sig).name}: "
                + "; ".join(c[:100] for c in left.values()))


def check_ui(url: str, shots: Path, *, plain: str, iw: str) -> None:
    """Open the study's runs, filter the iw runs, compare an iw/plain sweep pair: its parallel-coordinates chart, its
    params and validation curve."""
    from playwright.sync_api import sync_playwright

    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(url, wait_until="load")
            page.get_by_placeholder(PLACEHOLDER).wait_for(timeout=60_000)

            def body_until(ok) -> str:
                """The page's text once ``ok(text)`` holds (pages fill in a while after they open; slowly on a busy
                machine) or after 60 s."""
                deadline = time.time() + 60
                while True:
                    page.wait_for_timeout(1000)
                    text = page.inner_text("body")
                    if ok(text) or time.time() > deadline:
                        return text

            columns = ("config", "iw", "val_avg_recall", "holdout_avg_recall")  # the study's shared view
            body = body_until(lambda text: all(c in text for c in columns))
            page.screenshot(path=str(shots / "ui_runs.png"))
            assert "Token Usage" not in body, "the experiment opened on the GenAI overview"
            assert all(c in body for c in columns), [c for c in columns if c not in body]

            def search(text: str, until) -> list[str]:
                """The run names the runs page shows for ``text``, once ``until(names)`` holds (the grid updates
                a while after Enter; slowly on a busy machine) or after 60 s."""
                box = page.get_by_placeholder(PLACEHOLDER)
                box.fill(text)
                box.press("Enter")
                deadline = time.time() + 60
                while True:
                    page.wait_for_timeout(1500)
                    for _ in range(30):  # expand the stage parents that hold the matching runs
                        expander = page.locator("[role=gridcell] " + PLUS)
                        if expander.count() == 0:
                            break
                        expander.first.click()
                        page.wait_for_timeout(600)
                    cells = page.locator("[role=gridcell][col-id='attributes.`Run Name`']").all_inner_texts()
                    names = [c.split("\n")[-1] for c in cells]
                    if until(names) or time.time() > deadline:
                        return names

            def only_iw(names: list[str]) -> bool:
                trial_runs = [n for n in names if not n.startswith(("stage:", "study:"))]
                return bool(trial_runs) and all(n.split(":", 1)[1].startswith("iw-") for n in trial_runs)

            names = search("params.iw = 'true'", only_iw)
            page.screenshot(path=str(shots / "ui_iw_runs.png"))
            assert only_iw(names), names
            pair = (f"sweep:{plain}", f"sweep:{iw}")
            names = search("tags.stage = 'sweep'", lambda names: all(name in names for name in pair))
            for name in pair:
                assert name in names, names
                page.locator("[role=row]", has_text=name).first.locator("input[type=checkbox]").first.check()
            page.get_by_role("button", name="Compare").click()
            page.get_by_text("Comparing 2 Runs").wait_for(timeout=60_000)
            params = ("loss", "iw", "config", "training.optimizer.lr")
            body_until(lambda text: all(f"\n{param}\t" in text for param in params))
            page.screenshot(path=str(shots / "ui_compare.png"), full_page=True)
            # the compare page opens on its parallel-coordinates chart (plotly's parcoords): the numeric params in
            # which the runs differ (MLflow keeps them numbers) and a metric are its axes
            plot = page.locator(".js-plotly-plot").first
            plot.wait_for(timeout=60_000)
            axes = plot.text_content() or ""
            assert page.locator(".parcoords").count() >= 1 and "train_loss" in axes, axes[:400]
            text = page.inner_text("body")
            for param in params:
                assert f"\n{param}\t" in text, param
            assert "\niw\tfalse\ttrue" in text or "\niw\ttrue\tfalse" in text
            page.get_by_role("link", name="val_avg_recall", exact=True).first.click()
            page.get_by_text("Completed Runs").wait_for(timeout=60_000)
            text = body_until(lambda text: all(f"sweep:{name} (val_avg_recall)" in text for name in (plain, iw))
                              and "(step=4)" in text)
            page.screenshot(path=str(shots / "ui_val_curve.png"))
            for name in (plain, iw):  # both runs' validation curves, at the epochs the console printed
                assert f"sweep:{name} (val_avg_recall)" in text, text[-2000:]
            assert "(step=1)" in text and "(step=4)" in text, text[-2000:]  # the first (rung) and last validation
        finally:
            browser.close()
