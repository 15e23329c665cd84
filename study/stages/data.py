"""The data stage: the phantom generated (or a manifest prepared) into the study's cache, its splits checked."""

from __future__ import annotations

from study.stages.context import StudyContext, log


def stage_data(ctx: StudyContext) -> None:
    from study.preflight import check_lesions
    from trainables.data import Cache, make_phantom, prepare_cache

    d = ctx.cfg.data
    if d.source == "phantom":
        ph = d.phantom
        phantom_dir = ctx.dir.data_dir / "phantom"
        manifest = phantom_dir / "manifest.csv"
        if not manifest.is_file():
            log(f"data: generating the {ph.kind} phantom dataset ({ph.cases} cases, seed {ph.seed})")
            if ph.kind == "lidc":
                from trainables.data.lidc_phantom import make_lidc_phantom, write_data_summary

                manifest = make_lidc_phantom(phantom_dir, n_cases=ph.cases, seed=ph.seed, shape=tuple(ph.shape),
                                             nodules_per_case=tuple(ph.nodules_per_case))
                for line in write_data_summary(phantom_dir):
                    log(f"data: {line.strip()}")
            else:
                manifest = make_phantom(phantom_dir, n_cases=ph.cases, seed=ph.seed, shape=tuple(ph.shape),
                                        contrast=tuple(ph.contrast), noise=ph.noise)
        ctx.testing_pause("data")
        cache = prepare_cache(manifest, ctx.cache_dir(), preset="luna16" if ph.kind == "lidc" else "none")
    elif d.source == "manifest":
        log(f"data: preparing {d.path} with preset {d.preset}")
        cache = prepare_cache(d.path, ctx.cache_dir(), preset=d.preset)
    else:
        cache = Cache(d.path)
    counts = check_lesions(cache, ctx.cfg, where=ctx.cache_dir())
    log(f"data: cache {ctx.cache_dir()}: {counts['train']} train, {counts['val']} val, "
        f"{counts['holdout']} hold-out cases")
    if d.folds:
        write_folds(ctx, cache)
    ctx.state.mark_done("data", cache_dir=ctx.cache_dir(), cases=counts)


def write_folds(ctx: StudyContext, cache) -> None:
    """``folds.json``: the K folds over the train and validation cases (:func:`trainables.data.folds.make_folds`),
    made once per study; an existing file is kept as it is (a resumed study runs on the folds it began with)."""
    import json

    from trainables.data.folds import fold_splits, make_folds
    from trainables.io_utils import write_text_atomic

    d = ctx.cfg.data
    if ctx.dir.folds_file.is_file():
        ctx.dir.read_folds()  # checked, never made again
        return
    ids = cache.case_ids(list(d.train) + list(d.val))
    val = make_folds({c: cache.meta(c).get("diameters_mm", []) for c in ids}, d.folds, d.fold_seed)
    folds = [dict(zip(("train", "val"), fold_splits(val, k))) for k in range(d.folds)]
    write_text_atomic(ctx.dir.folds_file, json.dumps({"seed": d.fold_seed, "k": d.folds, "folds": folds}, indent=1))
    for k, f in enumerate(folds):
        lesions = sum(len(cache.meta(c).get("diameters_mm", [])) for c in f["val"])
        log(f"data: fold {k}: {len(f['train'])} training cases, {len(f['val'])} validation cases "
            f"({lesions} lesions)")
