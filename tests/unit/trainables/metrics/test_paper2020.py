"""Acceptance: the ``paper2020`` protocol reproduces the paper's Table 2 from the authors' own records.

The expected values are parsed at test time from the markdown table of ../shared/fixtures/paper-records/README.md;
none is written here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers import paper2020_loop
from trainables.metrics import load_records, summarize

TOLERANCE = 0.006
# README column header prefix -> fixture sub-folder
DATASET_DIRS = {"LUNA16": "luna", "LiTS": "lits"}
METRICS = {"avg Recall": "avg_recall", "obj DSC": "obj_dice"}


def parse_table(readme: Path) -> dict[tuple[str, str], dict[str, float]]:
    """(folder, loss) -> {summary key: expected value} from the README's markdown table; "(n/a)" cells skipped."""
    lines = [ln.strip() for ln in readme.read_text().splitlines() if ln.strip().startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[0] == "loss", f"unexpected table header {header}"
    columns = []
    for cell in header[1:]:
        dataset, metric = cell.split(" ", 1)
        columns.append((DATASET_DIRS[dataset], METRICS[metric]))
    table: dict[tuple[str, str], dict[str, float]] = {}
    for line in lines[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if set(cells[0]) <= set("-: "):
            continue  # the |---| separator
        for (folder, key), cell in zip(columns, cells[1:]):
            if re.fullmatch(r"\.?\d+(\.\d+)?", cell):
                table.setdefault((folder, cells[0]), {})[key] = float(cell)
    return table


def test_paper2020_reproduces_table2_for_every_fixture(paper_records_dir):
    table = parse_table(paper_records_dir / "README.md")
    files = sorted(paper_records_dir.glob("*/*.json"))
    assert len(files) >= 19 and len(table) >= 19
    failures, checked = [], 0
    for path in files:
        key = (path.parent.name, path.stem)
        assert key in table, f"{path} has no row in the README table"
        summary = summarize(load_records(path), "paper2020")
        for metric, expected in table[key].items():
            checked += 1
            if abs(summary[metric] - expected) > TOLERANCE:
                failures.append(f"{key[0]}/{key[1]} {metric}: {summary[metric]:.4f} vs Table 2 {expected}")
    assert not failures, "\n".join(failures)
    assert checked == 2 * len(files)
    assert {(p.parent.name, p.stem) for p in files} == set(table)  # every table row has its file


def test_parse_table_reads_the_readme(paper_records_dir):
    table = parse_table(paper_records_dir / "README.md")
    assert ("luna", "iwfl") not in table  # "(n/a)" in the README
    assert set(table[("lits", "iwfl")]) == {"avg_recall", "obj_dice"}
    assert all(0 < v < 1 for row in table.values() for v in row.values())


def test_vectorised_paper2020_equals_the_plain_loop(paper_records_dir):
    rs = load_records(paper_records_dir / "lits" / "dl.json")
    s = summarize(rs, "paper2020")
    mean, std = paper2020_loop(rs)
    assert s["avg_recall"] == pytest.approx(mean, abs=1e-12)
    assert s["avg_recall_std"] == pytest.approx(std, abs=1e-12)


def test_paper2020_fp_denominator_counts_cases_with_records(paper_records_dir):
    rs = load_records(paper_records_dir / "luna" / "bce.json")
    s = summarize(rs, "paper2020")
    with_records = sum(1 for c in rs.values() if c.records)
    assert s["n_images"] == with_records < len(rs) == s["n_cases"]
    assert summarize(rs, "luna16", n_boot=0)["n_images"] == len(rs)
