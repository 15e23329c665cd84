"""Benchmarks: scripts that print ratios measured side by side in one run (``python -m benchmarks.<name>``).

They are not part of the installed package; run them from the repository root.
"""


def new_study(space: dict, storage, *, num_cpus: int | None, source: str):
    """A study folder made in ``storage`` from the search space ``space`` as `study launch` makes it (frozen
    config, state, MLflow experiment), no stage run: its :class:`study.stages.context.StudyContext`."""
    from study import tracking
    from study.layout import StudyDir, StudyState, write_frozen_config
    from study.loader import config_from_dict
    from study.stages.context import StudyContext

    cfg = config_from_dict(space, source=source)
    study_dir = StudyDir.of(storage, cfg.name)
    study_dir.root.mkdir(parents=True)
    write_frozen_config(study_dir, cfg.to_dict())
    state = StudyState.create(study_dir.state_file, name=study_dir.name, tracking_uri=study_dir.default_tracking_uri())
    tracking.setup(state, study_dir, experiment_name=study_dir.name, cfg=cfg)
    return StudyContext(study_dir, cfg, state, num_cpus=num_cpus)
