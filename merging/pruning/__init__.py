"""Structured pruning of multitask networks (Torch-Pruning DepGraph, Taylor + magnitude, budgeted)."""

from merging.pruning.budget import Reference, Verdict, assess
from merging.pruning.config import PruneConfig
from merging.pruning.pruner import (
    check_set,
    missed_at_start,
    prune,
    reference_accuracy,
    within_budget,
)
from merging.pruning.steps import prune_step
from merging.pruning.surgery import remove_dead_groups

__all__ = [
    "PruneConfig",
    "Reference",
    "Verdict",
    "assess",
    "check_set",
    "missed_at_start",
    "prune",
    "prune_step",
    "reference_accuracy",
    "remove_dead_groups",
    "within_budget",
]
