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
    "study.cli.run",
    "study.cli.watch",
    "study.cli.data",
    "study.cli.metrics",
    "study.cli.catalog",
    "study.cli.predict",
    "study.cli.slurm",
    "study.cli.gpu",
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
    except OSError as exc:  # the filesystem said no: permission, not a folder, exists, disk full
        print(f"error: {os_error_message(exc)}", file=sys.stderr)
        return 2
    except UnicodeDecodeError as exc:
        print(f"error: a file is not UTF-8 text ({exc})", file=sys.stderr)
        return 2
    except Exception:
        import traceback

        traceback.print_exc()
        print(f"\nThis is a bug in study (not a problem with your input): please report it with the traceback "
              f"above and the command (study {' '.join(argv if argv is not None else sys.argv[1:])}).",
              file=sys.stderr)
        return 1
    return int(rc or 0)


def os_error_message(exc: OSError) -> str:
    """One line for an OS error: the path(s) and what the system said, with a hint for the common kinds."""
    import errno

    paths = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
    hints = {errno.EACCES: "no permission for this user: fix the mode or owner of the path, or pick another one",
             errno.EPERM: "not permitted; pick another folder",
             errno.EROFS: "read-only filesystem; pick a folder on a writable disk",
             errno.ENOSPC: "the disk is full; free space, then run the command again (`study resume` continues "
                           "a study)",
             errno.EDQUOT: "the disk quota is exceeded; free space, then run the command again",
             errno.ENOTDIR: "a part of this path is a file, not a folder",
             errno.EISDIR: "is a folder where a file is expected",
             errno.EEXIST: "already exists; remove it or pick another name",
             errno.ENOENT: "does not exist"}
    what = exc.strerror or str(exc)
    hint = hints.get(exc.errno)
    text = f"{paths}: {what}" if paths else what
    return text + (f" ({hint})" if hint and hint != what.lower() else "")
