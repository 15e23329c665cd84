"""The GPU benchmark script runs end to end (on the CPU here, at a toy size) and its projection is consistent."""

from __future__ import annotations

import json

import pytest

from trainables.gpu_bench import PROTOCOL_ITERATIONS, main, synthetic_batch


def test_synthetic_batch_has_real_iw_maps():
    x, y, w = synthetic_batch(32, 2)
    assert x.shape == y.shape == w.shape == (2, 1, 32, 32, 32)
    for b in range(2):
        fg = y[b, 0] > 0
        assert fg.any() and (w[b, 0][fg] > 1).all()  # lesions weigh more than background under the clip
        assert (w[b, 0][~fg] == 1).all()


def test_cpu_smoke_run_writes_consistent_rows(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert main(["--device", "cpu", "--size", "16", "--width", "0.125", "--iters", "1", "--warmup", "0",
                 "--configs", "iw-bce", "wce", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["config"], r["amp"]) for r in rows] == [("iw-bce", False), ("iw-bce", True), ("wce", False),
                                                       ("wce", True)]
    assert PROTOCOL_ITERATIONS == 100 * 100  # the paper: 100 epochs x 100 iterations
    for r in rows:
        # 10,000 iterations of 1 ms are 10 s = 1/360 h
        assert r["projected_hours"] == pytest.approx(r["ms_per_iter"] / 360)
        assert r["ms_per_iter"] > 0
        assert r["peak_gib"] is None  # no GPU figure is ever invented on a CPU
    assert capsys.readouterr().out.count("| iw-bce |") == 2
