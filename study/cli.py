"""``study``: the command line of the orchestrator.

Each concern registers its own sub-commands (``register(subparsers)`` in its module) and does its heavy
imports (torch, ray, mlflow) inside the handler, so ``study --help`` stays fast.
A :class:`trainables.errors.UserError` becomes a one-line message on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from trainables.errors import UserError

# modules that expose ``register(subparsers)``; each adds its sub-commands with ``set_defaults(func=...)``
_COMMAND_MODULES = (
    "study.commands",
    "study.data_cli",
    "study.metrics_cli",
    "study.catalog",
    "study.predict_cli",
    "study.slurm_cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="study",
        description="Hyperparameter studies of inverse-weighted losses for 3D lesion segmentation "
        "(Ray Tune + MLflow).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    import importlib

    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
