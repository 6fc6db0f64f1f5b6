"""Layout editors: DiffMix balancing and enlarging maps, and the GradMix pixel blend baseline."""

from nucsynth.edit.balance import (
    BalanceReport,
    BalanceWarning,
    balance_dataset,
    balance_layout,
    balance_layout_report,
    collect_rare_pool,
)
from nucsynth.edit.enlarge import enlarge_layout

__all__ = [
    "BalanceReport",
    "BalanceWarning",
    "balance_dataset",
    "balance_layout",
    "balance_layout_report",
    "collect_rare_pool",
    "enlarge_layout",
]
