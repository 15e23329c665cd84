"""Before the stages: how this study's trials run their step (memory layout, ``torch.compile``), chosen once
from a measurement and kept in ``state.json``."""

from __future__ import annotations

from study.stages.context import StudyContext, log
from trainables.errors import UserError


def choose_step_setup(ctx: StudyContext) -> None:
    """``model.channels_last`` / ``model.compile`` null: how this study's trials run their step, chosen once from
    a measurement of the study's own step and kept in ``state.json`` (``layout``, ``compile``), so a resumed
    study, its retrain and its hold-out use the same numerics.

    CPU trials: both layouts timed side by side on the driver (:func:`trainables.timing.step_choices`);
    channels-last only when it is at least 5 % faster (within noise of each other on this project's 2-core
    machines at the CPU preset, so the plain layout stays); ``torch.compile`` off. GPU trials: the same
    measurement, and eager vs compiled, in a Ray task with one trial's resources, i.e. on a GPU node the first
    time a GPU study runs (a node whose torch cannot use its GPU fails here, before any trial: exit 2).
    """
    from trainables.timing import step_choices

    m, gpu = ctx.cfg.model, ctx.cfg.resources.gpu > 0
    need = {"layout": m.channels_last is None and "layout" not in ctx.state.data,
            "compile": m.compile is None and gpu and "compile" not in ctx.state.data}
    if any(need.values()):
        if gpu:
            measured = _measure_on_a_trial_node(ctx, need)
        else:
            measured = step_choices(ctx.cfg, ctx.cfg.trials[0], layout=True, compile=False, device="cpu")
        for key, wanted in need.items():
            if wanted:
                ctx.state.data[key] = measured[key]
        if gpu and measured.get("step_seconds"):
            ctx.state.data.setdefault("gpu_step_seconds", []).append(round(measured["step_seconds"], 4))
        ctx.state.save()
    update = {}
    if m.channels_last is None:
        choice = ctx.state.data["layout"]
        update["channels_last"] = bool(choice["channels_last"])
        log(f"memory layout: {'channels-last' if choice['channels_last'] else 'NCDHW'} ({choice['reason']}; "
            "set model.channels_last to fix it)")
    if m.compile is None:
        choice = ctx.state.data.get("compile") if gpu else None
        update["compile"] = bool(choice and choice["compile"])
        if choice:
            log(f"torch.compile: {'on' if choice['compile'] else 'off'} ({choice['reason']}; set model.compile to "
                "fix it)")
    ctx.cfg = ctx.cfg.model_copy(update={"model": ctx.cfg.model.model_copy(update=update)})


def _measure_on_a_trial_node(ctx: StudyContext, need: dict[str, bool]) -> dict:
    """:func:`trainables.timing.step_choices` in a Ray task with one trial's resources (a GPU node)."""
    import ray

    from trainables.device import gpu_error_line, is_gpu_error
    from trainables.timing import step_choices

    ctx.ensure_ray()
    res = ctx.cfg.resources
    what = " and ".join(k for k, v in (("memory layout", need["layout"]), ("torch.compile", need["compile"])) if v)
    log(f"{what}: timing the study's step on a node with the trials' resources {res.as_ray()} (once per study"
        f"{'; waiting for a GPU node' if ctx.wait_for_resources else ''})")
    task = ray.remote(num_cpus=res.cpu, num_gpus=res.gpu, resources=res.custom or None, max_retries=0)(step_choices)
    try:
        return ray.get(task.remote(ctx.cfg, ctx.cfg.trials[0], layout=need["layout"], compile=need["compile"]))
    except ray.exceptions.RayTaskError as exc:
        if is_gpu_error(exc):
            raise UserError(gpu_error_line(exc)) from None
        raise
