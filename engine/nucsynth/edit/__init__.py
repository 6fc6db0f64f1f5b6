"""Layout editors: DiffMix balancing and enlarging maps, the GradMix pixel blend baseline,
and the region an edit changed (for re-rendering only that region)."""

from nucsynth.edit.balance import (
    BalanceReport,
    BalanceWarning,
    balance_dataset,
    balance_layout,
    balance_layout_report,
    collect_rare_pool,
)
from nucsynth.edit.enlarge import enlarge_layout
from nucsynth.edit.pool import POOL_LEAST, rare_pool
from nucsynth.edit.region import REGION_MARGIN, edited_region

__all__ = [
    "BalanceReport",
    "BalanceWarning",
    "balance_dataset",
    "balance_layout",
    "balance_layout_report",
    "collect_rare_pool",
    "enlarge_layout",
    "rare_pool",
    "POOL_LEAST",
    "edited_region",
    "REGION_MARGIN",
]
