"""``study data ...`` wiring: sub-commands, exit codes, and a smoke run of the data benchmark."""

from __future__ import annotations

import argparse

import pytest

from study.cli import build_parser, main
from study.cli import data as data_cli


def test_data_subcommands_are_registered():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    data_cli.register(sub)
    for argv in (
        ["data", "phantom", "--out", "x"],
        ["data", "prepare", "--manifest", "m", "--out", "c"],
        ["data", "luna16", "--raw", "r", "--out", "c"],
        ["data", "lits", "--raw", "r", "--out", "c"],
    ):
        args = parser.parse_args(argv)
        assert callable(args.func)
    args = build_parser().parse_args(
        ["data", "prepare", "--manifest", "m", "--out", "c", "--preset", "luna16"]
    )
    assert args.preset == "luna16" and args.func is data_cli._prepare


def test_bad_choices_and_missing_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["data", "prepare", "--manifest", "m", "--out", "c", "--preset", "ct"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        main(["data"])


def test_user_errors_exit_2_with_one_line(tmp_path, capsys):
    assert main(["data", "luna16", "--raw", str(tmp_path / "none"), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: LUNA16 folder not found: {tmp_path / 'none'}\n"
    (tmp_path / "raw" / "subset0").mkdir(parents=True)
    assert main(["data", "luna16", "--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "c")]) == 2
    assert "seg-lungs-LUNA16" in capsys.readouterr().err


def test_benchmark_smoke(tmp_path, capsys):
    from benchmarks.data import main as bench
    from trainables.data import make_phantom, prepare_cache

    prepare_cache(
        make_phantom(tmp_path / "ph", n_cases=4, shape=(24, 32, 32)), tmp_path / "c", progress=False
    )
    assert (
        bench(
            [
                "--cache",
                str(tmp_path / "c"),
                "--patch",
                "16",
                "16",
                "16",
                "--steps",
                "2",
                "--rounds",
                "1",
                "--worker-type",
                "thread",
                "--seconds",
                "0.2",
                "--pipeline-patch",
                "16",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "patches/s" in out and "sampler/thread" in out and "ratio sampler / fixed batch" in out
    assert "2 worker(s):" in out and "what the GPU step needs" in out
