"""Search-space YAML files shipped with the project (``demo.yaml`` is the embedded default)."""

from importlib.resources import files


def builtin_path(name: str):
    """Path of a bundled search space, e.g. ``builtin_path("demo")``."""
    return files(__name__) / f"{name}.yaml"
