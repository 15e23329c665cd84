"""``study predict NAME --input DIR_OR_MANIFEST --output DIR``: apply a study's retrained winners to new images.

The models are the last-epoch checkpoints of the retrain stage (one per configuration and seed). The default
configuration is the study's best on the hold-out: the highest mean avg recall under the study's strict hit
rule over its seeds (ties: the higher mean object Dice); without ``--ensemble`` its seed with the highest strict
avg recall. The threshold is the paper's p > 0.5, or the configuration's validation-calibrated threshold when
the study used ``evaluation.threshold: calibrated``. The work itself is :mod:`trainables.predict`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from trainables.errors import UserError


def register(sub) -> None:
    p = sub.add_parser(
        "predict", help="apply a study's retrained winners to new images (NIfTI, MHA/MHD, NRRD)",
        description="Write <case>_prob.nii.gz, <case>_mask.nii.gz and <case>_lesions.csv for every input image, "
        "preprocessed with the study's preset and inferred with its sliding window. Default configuration: the "
        "study's best on the hold-out (highest mean strict-rule avg recall over seeds, ties by object Dice).")
    p.add_argument("name", help="the study (a folder under --storage)")
    p.add_argument("--storage", default="studies", help="folder holding the studies (default ./studies)")
    p.add_argument("--input", required=True, help="a folder of images or a manifest CSV (image[, roi] columns)")
    p.add_argument("--output", required=True, help="output folder (refused if it holds other files)")
    p.add_argument("--roi", help="folder of ROI masks named like the images (presets luna16 / lits need one)")
    p.add_argument("--config", action="append", metavar="LABEL",
                   help="configuration (e.g. iw-dice) or one model (iw-dice/s1); repeatable; default: the best")
    p.add_argument("--ensemble", action="store_true", help="average the probabilities of every seed of the "
                   "chosen configuration(s)")
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
        if not seeds:
            raise UserError(f"--config {name}: not a configuration of this study; known: {', '.join(known)} "
                            "(or one model, e.g. " + labels[0] + ")")
        if ensemble:
            chosen.extend(seeds)
        else:
            chosen.append(max(seeds, key=lambda lb: (summary["configs"][lb]["strict"]["avg_recall"] or -1, lb)))
    return chosen


def cmd_predict(args) -> int:
    import torch

    from study.layout import StudyDir, read_frozen_config
    from study.tuner import outcomes
    from trainables.config import StudyConfig, validate
    from trainables.data import Cache
    from trainables.evaluate import build_model, load_state, task_device
    from trainables.naming import trial_label
    from trainables.predict import find_inputs, output_paths, predict_probability, write_outputs
    from trainables.step import Precision

    sd = StudyDir.of(args.storage, args.name).require()
    summary_file = sd.holdout_dir / "summary.json"
    if not summary_file.is_file():
        raise UserError(f"study {sd.name}: the hold-out stage has not finished ({summary_file} missing); "
                        f"`study resume {sd.name}` completes it")
    summary = json.loads(summary_file.read_text())
    cfg = validate(StudyConfig, read_frozen_config(sd), source=str(sd.config_file))
    labels = choose_models(summary, args.config, args.ensemble)
    cache_dir = cfg.data.path if cfg.data.source == "cache" else sd.data_dir / "cache"
    preset = Cache(cache_dir).preset  # the preset the training cases were prepared with
    checkpoints = {trial_label(r.spec): r.checkpoint_path for r in outcomes(sd.ray_dir, "retrain")}
    missing = [lb for lb in labels if not checkpoints.get(lb)]
    if missing:
        raise UserError(f"study {sd.name}: no retrained checkpoint for {', '.join(missing)}")
    thresholds = {summary["configs"][lb].get("calibrated", {}).get("threshold", 0.5) for lb in labels}
    threshold = float(thresholds.pop()) if len(thresholds) == 1 else 0.5

    cases = find_inputs(args.input, args.roi)
    cache = Cache(cache_dir)
    trained_on_roi = any(cache.meta(c).get("sources", {}).get("roi") for c in cache.case_ids())
    if trained_on_roi and any(c.roi is None for c in cases):
        print(f"warning: the study's cases were cropped to an ROI (preset {preset}); images without one are "
              "predicted whole, which the model has not seen (give --roi DIR)", file=sys.stderr)
    out = Path(args.output).expanduser().resolve()
    ours = {p.name for c in cases for p in output_paths(out, c.case_id).values()}
    if out.exists():
        if not out.is_dir():
            raise UserError(f"--output {out}: exists and is not a folder")
        other = sorted(p.name for p in out.iterdir() if p.name not in ours)
        if other:
            raise UserError(f"--output {out}: holds other files ({', '.join(other[:5])}{', ...' * (len(other) > 5)});"
                            " choose an empty folder")
        if ours & {p.name for p in out.iterdir()} and not args.overwrite:
            raise UserError(f"--output {out}: holds outputs of an earlier prediction; add --overwrite to "
                            "replace them")

    device = task_device()
    torch.set_num_threads(cfg.resources.threads)
    precision = Precision.for_device(device, cfg.training.amp)
    models = []
    for lb in labels:
        model = build_model(cfg.model)
        model.load_state_dict(load_state(checkpoints[lb])["model"])
        models.append(model.to(device).eval())
    print(f"predict: {len(cases)} image(s) with {' + '.join(labels)} on {device}; preset {preset}, "
          f"p > {threshold:g}; writing to {out}", file=sys.stderr, flush=True)
    for i, case in enumerate(cases, 1):
        prob, logit, geom = predict_probability(models, case, preset=preset, inference=cfg.inference,
                                                device=device, precision=precision)
        paths = write_outputs(out, case.case_id, prob, logit, geom, threshold)
        n = sum(1 for _ in open(paths["lesions"])) - 1
        print(f"[{i}/{len(cases)}] {case.case_id}: {n} predicted lesion(s)", file=sys.stderr, flush=True)
    return 0
