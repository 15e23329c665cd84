"""Detection metrics on per-object records (SPEC §7).

Volumes -> records (:mod:`.records`, once per inference) -> summaries (:mod:`.summary`, pure and cheap):
FROC under the ``luna16`` and ``paper2020`` protocols, object Dice, size groups, case-level bootstrap
(:mod:`.bootstrap`), JSON in the authors' format or ours (:mod:`.io`), figures (:mod:`.plots`).
"""

from trainables.metrics.bootstrap import VERDICT_METRICS, hierarchical_bootstrap
from trainables.metrics.froc import LUNA_FP_RATES
from trainables.metrics.io import load_records, read_records, save_records
from trainables.metrics.records import (
    DEFAULT_HIT_THRESHOLDS,
    HIT_RULES,
    CaseRecords,
    RecordSet,
    equivalent_diameter,
    volume_records,
    volume_records_multi,
)
from trainables.metrics.summary import CLINICAL_CUTOFFS_MM, PROTOCOLS, froc_curve, size_groups, summarize

__all__ = [
    "CLINICAL_CUTOFFS_MM",
    "DEFAULT_HIT_THRESHOLDS",
    "HIT_RULES",
    "LUNA_FP_RATES",
    "VERDICT_METRICS",
    "PROTOCOLS",
    "CaseRecords",
    "RecordSet",
    "equivalent_diameter",
    "froc_curve",
    "load_records",
    "hierarchical_bootstrap",
    "read_records",
    "save_records",
    "size_groups",
    "summarize",
    "volume_records",
    "volume_records_multi",
]
