"""Detection metrics on per-object records (docs/definitions.md §7).

Volumes -> records (once per inference) -> summaries (pure and cheap). The modules:

* :mod:`.records`: records of one volume under a hit rule; the hit-rule registry ``HIT_RULES`` (one
  :class:`HitRule` record per rule, :func:`register_hit_rule`); the record types.
* :mod:`.summary`: summaries under a metric protocol; the protocol registry ``PROTOCOLS`` (one
  :class:`Protocol` record per protocol: ``luna16``, ``paper2020``; :func:`register_protocol`); FROC curves,
  object Dice, size groups.
* :mod:`.froc`: the FROC numerics on flat arrays (curves of many replicates at once, row-wise interpolation).
* :mod:`.bootstrap`: case-level bootstrap and the verdict's hierarchical comparison.
* :mod:`.io`: records JSON in the authors' format or ours. :mod:`.plots`: figures.
* :mod:`.bench`: the benchmark (``python -m benchmarks.metrics``) and its reference implementations.
"""

from trainables.metrics.bootstrap import VERDICT_METRICS, hierarchical_bootstrap
from trainables.metrics.froc import LUNA_FP_RATES
from trainables.metrics.io import load_records, read_records, save_records
from trainables.metrics.records import (
    DEFAULT_HIT_THRESHOLDS,
    HIT_RULES,
    CaseRecords,
    HitRule,
    RecordSet,
    equivalent_diameter,
    get_hit_rule,
    register_hit_rule,
    volume_records,
    volume_records_multi,
)
from trainables.metrics.summary import (
    CLINICAL_CUTOFFS_MM,
    DEFAULT_PROTOCOL,
    PROTOCOLS,
    Protocol,
    froc_curve,
    get_protocol,
    register_protocol,
    size_groups,
    summarize,
)

__all__ = [
    "CLINICAL_CUTOFFS_MM",
    "DEFAULT_HIT_THRESHOLDS",
    "DEFAULT_PROTOCOL",
    "HIT_RULES",
    "LUNA_FP_RATES",
    "VERDICT_METRICS",
    "PROTOCOLS",
    "CaseRecords",
    "HitRule",
    "Protocol",
    "RecordSet",
    "equivalent_diameter",
    "froc_curve",
    "get_hit_rule",
    "get_protocol",
    "load_records",
    "hierarchical_bootstrap",
    "read_records",
    "register_hit_rule",
    "register_protocol",
    "save_records",
    "size_groups",
    "summarize",
    "volume_records",
    "volume_records_multi",
]
