"""Ray Tune glue of the driver: the Tuner (build, restore, outcomes), the param space, ASHA with persisted rungs, and the callback that logs every trial to MLflow."""
