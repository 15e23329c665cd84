"""The command line's shared argument types and options, spelled once."""

from __future__ import annotations

import argparse

#: where studies live unless --storage says otherwise
DEFAULT_STORAGE = "studies"


def number(kind: type, what: str, low: float, high: float = float("inf")):
    """An argparse type: a ``kind`` number in [low, high], refused with ``what`` it must be."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not low <= value <= high or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{text} is not {what}")
        return value
    return parse


positive_int = number(int, "a positive integer", 1)
positive_float = number(float, "a positive number", 1e-9)
positive_seconds = number(float, "a positive number of seconds", 1e-9)
port = number(int, "a TCP port (1-65535)", 1, 65535)


def add_storage(p: argparse.ArgumentParser, *, cluster: bool = False) -> None:
    """``--storage``: the folder holding the studies."""
    more = "; shared storage on a cluster" if cluster else ""
    p.add_argument("--storage", default=DEFAULT_STORAGE,
                   help=f"folder holding the studies (default ./{DEFAULT_STORAGE}{more})")


def add_cluster_options(p: argparse.ArgumentParser) -> None:
    """What a command that runs stages needs: the storage, the Ray cluster, waiting for resources, local CPUs."""
    add_storage(p, cluster=True)
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")
    p.add_argument("--wait-for-resources", action="store_true",
                   help="do not fail when no node has the requested GPUs/resources yet (autoscaling clusters)")
    p.add_argument("--num-cpus", type=positive_int, help="CPUs of the local Ray (default: all)")
