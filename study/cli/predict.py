"""``study predict NAME --input DIR_OR_MANIFEST --output DIR``: apply a study's retrained winners to new images.

The models are the last-epoch checkpoints of the retrain stage (one per configuration and seed). The default
configuration is the study's best on the hold-out: the highest mean avg recall under the study's strict hit
rule over its seeds (ties: the higher mean object Dice); without ``--ensemble`` its seed with the highest strict
avg recall. The threshold is the paper's p > 0.5, or the configuration's validation-calibrated threshold when
the study used ``evaluation.threshold: calibrated``. The work itself is :mod:`trainables.predict`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from study.cli.args import add_storage
from trainables.errors import UserError


def register(sub) -> None:
    p = sub.add_parser(
        "predict", help="apply a study's retrained winners to new images (NIfTI, MHA/MHD, NRRD)",
        description="Write <case>_prob.nii.gz, <case>_mask.nii.gz and <case>_lesions.csv for every input image, "
        "preprocessed with the study's preset and inferred with its sliding window. Default configuration: the "
        "study's best on the hold-out (highest mean strict-rule avg recall over seeds, ties by object Dice): "
        "a choice made on the hold-out cases, so its hold-out numbers are optimistic for new data.")
    p.add_argument("name", nargs="?", help="the study (a folder under --storage); not needed with --model")
    p.add_argument("--model", metavar="URI", help="an MLflow model a study logged (models:/<id>, or runs:/...); "
                   "its preset, inference settings and threshold come with it: no study folder needed")
    p.add_argument("--tracking-uri", help="MLflow tracking URI the --model lives in (default "
                   "$MLFLOW_TRACKING_URI)")
    add_storage(p)
    p.add_argument("--input", required=True, help="a folder of images or a manifest CSV (image[, roi] columns)")
    p.add_argument("--output", required=True, help="output folder (refused if it holds other files)")
    p.add_argument("--roi", help="folder of ROI masks named like the images, on their grids (presets luna16 / lits "
                   "need one): the ROI the cache used, e.g. for LUNA16 the lung mask the preparer derived")
    p.add_argument("--config", action="append", metavar="LABEL",
                   help="configuration (e.g. iw-dice) or one model (iw-dice/s1); repeatable; default: the best")
    p.add_argument("--ensemble", action="store_true", help="average the probabilities of every seed of the "
                   "chosen configuration(s); in a cross-validated study (data.folds) of every fold model of "
                   "every seed")
    p.add_argument("--overwrite", action="store_true", help="replace this command's earlier outputs in --output")
    p.set_defaults(func=cmd_predict)


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else float("-inf")


def best_configuration(summary: dict[str, Any]) -> str:
    """The configuration (label without seed) with the highest mean strict avg recall, ties by object Dice."""
    by_config: dict[str, list[dict]] = {}
    for label, c in summary["configs"].items():
        by_config.setdefault(label.rsplit("/", 1)[0], []).append(c)
    return max(by_config, key=lambda k: (_mean(c["strict"]["avg_recall"] for c in by_config[k]),
                                         _mean(c["luna16"]["obj_dice"] for c in by_config[k]), k))


def choose_models(summary: dict[str, Any], configs: list[str] | None, ensemble: bool) -> list[str]:
    """Model labels (``config/s<seed>``) to average."""
    labels = list(summary["configs"])
    known = sorted({lb.rsplit("/", 1)[0] for lb in labels})
    chosen = []
    for name in configs or [best_configuration(summary)]:
        if name in summary["configs"]:
            chosen.append(name)
            continue
        seeds = [lb for lb in labels if lb.rsplit("/", 1)[0] == name]
        if not seeds:  # a configuration name (iw-focal) for a label with parameters (iw-focal[alpha=...])
            seeds = [lb for lb in labels if summary["configs"][lb].get("config") == name]
            settings = {lb.rsplit("/", 1)[0] for lb in seeds}
            if len(settings) > 1:
                raise UserError(f"--config {name}: the study has {len(settings)} settings of it "
                                f"({', '.join(sorted(settings))}); name one")
        if not seeds:
            raise UserError(f"--config {name}: not a configuration of this study; known: {', '.join(known)} "
                            "(or one model, e.g. " + labels[0] + ")")
        if ensemble:
            chosen.extend(seeds)
        else:
            chosen.append(max(seeds, key=lambda lb: (summary["configs"][lb]["strict"]["avg_recall"] or -1, lb)))
    return chosen


def _load_mlflow_model(uri: str, tracking_uri: str | None):
    """``(model, metadata)`` of a model logged by a study (:func:`study.tracking.log_model`)."""
    import mlflow
    import mlflow.pytorch

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    try:
        meta = mlflow.models.get_model_info(uri).metadata or {}
        model = mlflow.pytorch.load_model(uri, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - an unknown URI, an unreachable server...
        raise UserError(f"--model {uri}: cannot be loaded ({type(exc).__name__}: {str(exc)[:300]})") from None
    missing = [k for k in ("preset", "inference", "threshold") if k not in meta]
    if missing:
        raise UserError(f"--model {uri}: not a model logged by a study (metadata lacks {', '.join(missing)})")
    return model, meta


def cmd_predict(args) -> int:

    if args.model:
        return _predict_with_mlflow_model(args)
    if not args.name:
        raise UserError("study predict: give a study NAME or --model URI")
    if args.overwrite:  # replacing earlier outputs: one driver of the study at a time (study.lock)
        from study.layout import StudyDir
        from study.lock import driver_lock

        with driver_lock(StudyDir.of(args.storage, args.name).require(), "predict --overwrite"):
            return _predict_study(args)
    return _predict_study(args)


def _predict_study(args) -> int:
    import torch

    from study.layout import RETRAIN, SWEEP, open_study
    from study.stages.context import StudyContext
    from study.tune.tuner import outcomes
    from trainables.build import build_model, load_state
    from trainables.config import TrialSpec
    from trainables.data import Cache
    from trainables.device import task_device
    from trainables.naming import trial_label
    from trainables.predict import find_inputs
    from trainables.step import Precision

    sd, cfg, state = open_study(args.storage, args.name, writes=False)  # predict reads the study; logs nothing
    if not Path(args.input).expanduser().exists():
        raise UserError(f"--input {args.input}: no such file or folder (a folder of images or a manifest CSV)")
    summary_file = sd.summary_file
    if not summary_file.is_file():
        raise UserError(f"study {sd.name}: the hold-out stage has not finished ({summary_file} missing); "
                        f"`study resume {sd.name}` completes it")
    summary = sd.read_summary()
    labels = choose_models(summary, args.config, args.ensemble)
    cache = Cache(StudyContext(sd, cfg, state).cache_dir())
    preset = cache.preset  # the preset the training cases were prepared with
    if cfg.data.folds and (args.ensemble or cfg.holdout_models == "folds"):  # the fold models of each seed
        checkpoints: dict[str, list[str]] = {}
        for r in outcomes(sd.ray_dir, SWEEP):
            if r.status == "TERMINATED":
                checkpoints.setdefault(trial_label({**r.spec, "fold": None}), []).append(r.checkpoint_path)
        what = "fold models"
    else:
        checkpoints = {trial_label(r.spec): [r.checkpoint_path] for r in outcomes(sd.ray_dir, RETRAIN)}
        what = "retrained checkpoint"
    missing = [lb for lb in labels if not checkpoints.get(lb)]
    if missing:
        raise UserError(f"study {sd.name}: no {what} for {', '.join(missing)}")
    # one threshold per model (its validation-calibrated one, else 0.5); an ensemble takes their median
    thresholds = sorted(float((summary["configs"][lb].get("calibrated") or {}).get("threshold", 0.5)) for lb in labels)
    threshold = thresholds[len(thresholds) // 2] if len(thresholds) % 2 else \
        (thresholds[len(thresholds) // 2 - 1] + thresholds[len(thresholds) // 2]) / 2
    if len(set(thresholds)) > 1:
        print(f"predict: the models' calibrated thresholds differ ({', '.join(f'{t:g}' for t in thresholds)}); "
              f"the ensemble uses their median, {threshold:g}", file=sys.stderr)

    cases = find_inputs(args.input, args.roi)
    trained_on_roi = any(cache.meta(c).get("sources", {}).get("roi") for c in cache.case_ids())
    if trained_on_roi and any(c.roi is None for c in cases):
        print(f"warning: the study's cases were cropped to an ROI (preset {preset}); images without one are "
              "predicted whole, which the model has not seen (give --roi DIR)", file=sys.stderr)
    out = Path(args.output).expanduser().resolve()
    _check_output(out, cases, args.overwrite)

    device = task_device()
    torch.set_num_threads(cfg.resources.threads)
    precision = Precision.for_device(device, cfg.training.amp)
    models = []
    for lb in labels:
        c = summary["configs"][lb]
        network = cfg.for_trial(TrialSpec(loss=c["loss"], iw=c["iw"], params=c["params"], seed=c["seed"])).model
        for ckpt in checkpoints[lb]:
            model = build_model(network, cfg.training.patch_size)
            model.load_state_dict(load_state(ckpt)["model"])
            models.append(model.to(device).eval())
    n_folds = sum(len(checkpoints[lb]) for lb in labels)
    return _run(models, cases, out, preset=preset, inference=cfg.inference, threshold=threshold,
                precision=precision, device=device,
                what=" + ".join(labels) + (f" ({n_folds} fold models)" if what == "fold models" else ""))


def _check_output(out: Path, cases, overwrite: bool) -> None:
    """Refuse an output folder that holds other files, or this command's earlier outputs without --overwrite."""
    from trainables.predict import output_paths

    ours = {p.name for c in cases for p in output_paths(out, c.case_id).values()}
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"--output {out}: exists and is not a folder")
    names = {p.name for p in out.iterdir()}
    other = sorted(names - ours)
    if other:
        raise UserError(f"--output {out}: holds other files ({', '.join(other[:5])}{', ...' * (len(other) > 5)}); "
                        "choose an empty folder")
    if names & ours and not overwrite:
        raise UserError(f"--output {out}: holds outputs of an earlier prediction; add --overwrite to replace them")


def _run(models, cases, out: Path, *, preset: str, inference, threshold: float, precision, device, what: str) -> int:
    from trainables.predict import predict_probability, write_outputs

    print(f"predict: {len(cases)} image(s) with {what} on {device}; preset {preset}, p > {threshold:g}; "
          f"writing to {out}", file=sys.stderr, flush=True)
    for i, case in enumerate(cases, 1):
        prob, logit, geom = predict_probability(models, case, preset=preset, inference=inference, device=device,
                                                precision=precision)
        paths = write_outputs(out, case.case_id, prob, logit, geom, threshold)
        n = sum(1 for _ in open(paths["lesions"])) - 1
        print(f"[{i}/{len(cases)}] {case.case_id}: {n} predicted lesion(s)", file=sys.stderr, flush=True)
    return 0


def _predict_with_mlflow_model(args) -> int:
    from trainables.config import InferenceConfig
    from trainables.device import task_device
    from trainables.predict import find_inputs

    model, meta = _load_mlflow_model(args.model, args.tracking_uri)
    cases = find_inputs(args.input, args.roi)
    out = Path(args.output).expanduser().resolve()
    _check_output(out, cases, args.overwrite)
    device = task_device()
    return _run([model.to(device).eval()], cases, out, preset=meta["preset"],
                inference=InferenceConfig.model_validate(meta["inference"]), threshold=float(meta["threshold"]),
                precision=None, device=device, what=f"{args.model} ({meta.get('label', '?')})")
