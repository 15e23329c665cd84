"""``study gpu-check``: refuses a machine without CUDA, runs every section at toy sizes on the CPU (--smoke), and
renders a recorded JSON as the README's table."""

from __future__ import annotations

import json

import pytest
import torch

from study.cli import main
from study.cli.gpu import markdown, read_report
from tests.conftest import PROJECT_ROOT
from trainables.errors import UserError
from trainables.gpucheck import PROTOCOL_ITERATIONS, SECTIONS

RECORDED = PROJECT_ROOT / "tests" / "fixtures" / "gpu_check_cpu_smoke.json"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_exits_2_and_says_so(tmp_path, capsys):
    assert main(["gpu-check", "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "no usable CUDA device here" in err and f"torch {torch.__version__}" in err and "--smoke" in err
    assert not (tmp_path / "x.json").exists()
    assert main(["gpu-check", "--device", "cpu"]) == 2  # a CPU is never measured as if it were the GPU
    assert "add --smoke" in capsys.readouterr().err
    assert main(["gpu-check", "--device", "cpu", "--smoke", "--sections", "step,warp"]) == 2
    assert "unknown section(s) warp" in capsys.readouterr().err


def test_a_smoke_run_measures_the_sections_it_is_given_and_renders_them(tmp_path, capsys):
    out = tmp_path / "gpu" / "cpu.json"
    assert main(["gpu-check", "--device", "cpu", "--smoke", "--minutes", "0.2", "--sections",
                 "step,window,checkpoint", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["smoke"] is True and list(report["sections"]) == ["step", "window", "checkpoint"]
    rows = report["sections"]["step"]["rows"]
    assert [(r["config"], r["amp"]) for r in rows] == [("iw-bce", False), ("iw-bce", True), ("dice", False),
                                                       ("dice", True)]
    assert PROTOCOL_ITERATIONS == 100 * 100  # the paper: 100 epochs x 100 iterations
    for r in rows:
        assert r["projected_hours"] == pytest.approx(r["ms_per_iter"] * PROTOCOL_ITERATIONS / 3.6e6)
        assert r["peak_gib"] is None and r["precision"] == "fp32"  # no GPU figure is made up on a CPU
    win = report["sections"]["window"]
    assert win["windows"] == 2 * 2 * 2  # 40 x 48 x 56 by 32-windows with stride 24: starts 0/8, 0/16, 0/24
    assert win["overlapped_seconds_per_case"] == max(win["device_seconds"], win["host_records_seconds"])
    assert report["sections"]["checkpoint"]["megabytes"] > 0
    printed = capsys.readouterr().out
    assert printed.endswith(markdown(report)) and "not GPU figures" in printed


def test_the_markdown_of_a_recorded_json():
    """The README's table comes from this renderer: every row and figure of the JSON, formatted once."""
    report = read_report(RECORDED)
    assert set(report["sections"]) == set(SECTIONS)  # the recorded run has every section
    text = markdown(report)
    lines = text.splitlines()
    assert lines[0].startswith("Measured with `study gpu-check` on CPU; torch ")
    assert "**Smoke run at toy sizes: these figures check the command, they are not GPU figures.**" in lines
    head = lines.index("| configuration | precision | ms / iteration | peak GPU memory (GiB) | 10,000 iterations (h) |")
    rows = report["sections"]["step"]["rows"]
    table = lines[head + 2: head + 2 + len(rows)]
    for r, line in zip(rows, table):
        assert line == (f"| {r['config']} | {r['precision']} | {r['ms_per_iter']:.1f} | – | "
                        f"{r['projected_hours']:.2f} |")
    layout = report["sections"]["layout"]
    assert (f"- channels-last / NCDHW step time: AMP off {layout['layout_amp_off']['ratio']:.2f}, AMP on "
            f"{layout['layout_amp_on']['ratio']:.2f} (below 0.95: a study picks channels-last)") in lines
    loop = report["sections"]["loop"]["workers"]
    assert f"{loop['2']['ratio']:.3f} with 2 worker(s)" in text
    shared = report["sections"]["shared"]
    assert f"{shared['combined_it_per_s']:.2f} it/s together vs {shared['single']['it_per_s']:.2f}" in text
    assert "torch.compile: skipped" in text


def test_a_failed_section_is_shown_as_failed_and_a_foreign_json_is_refused(tmp_path, capsys):
    report = read_report(RECORDED)
    report["sections"]["window"] = {"error": "OutOfMemoryError: CUDA out of memory", "wall_seconds": 1.0}
    assert "- window: failed (OutOfMemoryError: CUDA out of memory)" in markdown(report)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"rows": []}))
    with pytest.raises(UserError, match="not a `study gpu-check` JSON"):
        read_report(other)
    assert main(["gpu-check", "--markdown", str(RECORDED)]) == 0
    assert capsys.readouterr().out == markdown(read_report(RECORDED))
