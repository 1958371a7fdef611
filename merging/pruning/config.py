"""The pruner's settings."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PruneConfig:
    budget: float = 1.0  # max accuracy drop (points) of any task vs its reference on the check set
    confidence: float = 0.9  # one-sided confidence that the drop is within budget (0.5: point estimate)
    step: float = 0.1  # fraction of the combination-weighted MACs removed per prune step
    min_step: float = 0.02  # after a rejected step the step halves; below this, pruning stops (or freezes)
    max_steps: int = 40  # hard cap on prune steps (accepted or not)
    schedule: str = "halving"  # step schedule: a name in ``merging.pruning.schedule.SCHEDULES``
    finetune_epochs: int = 5  # joint-loss fine-tuning after every prune step
    retry_epochs: int = 5  # a step that misses the budget gets this much more fine-tuning before it is undone
    retry_checks: int = 1  # ... in this many equal fine-tunes, each judged; the first that passes ends the retry
    # (each look is one more decision at the rule's per-decision error rates, results/budget-rule.md)
    final_epochs: int = 10  # a longer fine-tune of the accepted network at the end (kept if within budget)
    final_lr: float = 5e-4  # its peak learning rate (one-cycle, decaying to ~0)
    recover_epochs: int = 20  # fine-tuning before pruning when the start network misses the budget
    recover_rounds: int = 3  # ... repeated (each round checked) at most this many times
    recover_lr: float = 3e-3  # its learning rate (a regrouped network may need real retraining)
    recover_batch_size: int | None = None  # its batch size (None: ``batch_size``)
    lr: float = 1e-3  # fine-tuning learning rate (one-cycle per fine-tune)
    batch_size: int = 64  # fine-tuning batch size
    epoch_samples: int | None = None  # a fine-tuning "epoch" sees at most this many samples (None: the whole split)
    criterion: str = "taylor+magnitude"  # channel importance: a name in ``merging.pruning.criteria.CRITERIA``
    magnitude_weight: float = 0.25  # weight of the (layer-normalised) magnitude term in "taylor+magnitude"
    taylor_batches: int = 8  # training batches (of 128) whose joint-loss gradients feed Taylor importance
    price: str = "share"  # what divides a channel's importance: a name in ``merging.pruning.prices.PRICES``
    check_shifts: int = 4  # the budget is checked on val plus this many 1-pixel-shifted copies of it ...
    shift_below: int = 5000  # ... while val has fewer images than this (a large val is evidence enough)
    certify_share: float = 0.0  # share of the check set held out for one certification at the end (0: none;
    # results/budget-rule.md: one 10,000-image set at 90% meets both error targets, 5,000 + 5,000 does not)
    steer_confidence: float | None = None  # the step decisions' confidence (None: ``confidence``)
    distill: float = 0.0  # weight of the reference networks' outputs in fine-tuning losses (0: labels only;
    # results/distill.md: on a PAM merge they did not lower the drop bounds, on digits they raised them)
    removes: str = "channels"  # what a step removes: a name in ``merging.pruning.steps.STEPS`` (channels |
    # pairs: (channel, task) pairs, a channel leaves a task's set before it goes, regroup.py)
    per_task_stop: bool = True  # a task whose budget stops pruning freezes what serves it; the rest go on
    seed: int = 0  # seeds fine-tuning, the check set's shifts and the Taylor batches
    progress: bool = True  # tqdm bar over prune steps
