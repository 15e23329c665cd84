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
        cache = prepare_cache(manifest, ctx.cache_dir(), preset="luna16" if ph.kind == "lidc" else "none")
    elif d.source == "manifest":
        log(f"data: preparing {d.path} with preset {d.preset}")
        cache = prepare_cache(d.path, ctx.cache_dir(), preset=d.preset)
    else:
        cache = Cache(d.path)
    counts = check_lesions(cache, ctx.cfg, where=ctx.cache_dir())
    log(f"data: cache {ctx.cache_dir()}: {counts['train']} train, {counts['val']} val, "
        f"{counts['holdout']} hold-out cases")
    ctx.state.mark_done("data", cache_dir=ctx.cache_dir(), cases=counts)
