"""Mergers: strategies that turn N single-task networks into one multitask network."""

from merging.mergers import mtz, pam, separate, shared  # noqa: F401  (registration side effects)
from merging.mergers.base import Merger, check_mergeable, create_merger, list_mergers, register_merger

__all__ = ["Merger", "check_mergeable", "create_merger", "list_mergers", "register_merger"]
