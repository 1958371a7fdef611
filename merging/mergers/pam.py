"""``pam``: Pruning-Aware Merging (He et al., arXiv 1905.09676), general form.

Per layer, the channels of all N single-task networks are pooled. On a calibration batch, the
mutual information (``merging.mi``) between sets of channels and each task's labels decides,
for every task t, a small set of channels that keeps (1 - delta) of what the whole layer knows
about t; the rest are *jointly irrelevant* to t. A channel goes to the group of exactly the tasks
it is relevant to (``split="general"``), or, with ``split="two-level"`` (the paper's form), to
the shared group of all tasks when relevant to two or more and to its task's exclusive group when
relevant to one. Channels relevant to no task are dropped.

Choosing each task's relevant set: the candidates are ranked by their own information about t,
channels already relevant to an earlier task first (``share_first``: reusing a channel another
task keeps costs that task nothing extra, and a channel shared by more tasks is paid for once
per combination), then the smallest prefix of that ranking whose joint information reaches
(1 - delta) of the best joint information seen over prefixes (not of the whole layer's: in high
dimension the kernel estimate of a huge set is diluted by uninformative channels).

Hardest task first (most label entropy); for each task the candidate lists tried are: channels
earlier tasks keep (``share_first``), then the task's own network's channels (``own_first``: its
head reads them), then the whole ranking. ``min_keep`` then pads the set, along the same
ranking, to a floor of the task's own network width: information on a calibration batch
saturates long before accuracy does (2-3 neurons "know" a binary label).

Consistency with the wiring rule: the weights come from the block-diagonal union of the
originals, so a channel reads the channels below it *of its own source network*, and under the
wiring rule a group of set S may only read groups of sets S' ⊇ S. Two ways to reconcile them:

- ``consistency="cut"`` (default, the paper's way): every channel keeps its relevance set and
  reads only the parents the wiring rule allows; weights from a parent whose set is not a
  superset are cut (zero). Where a group would have no superset group at all below it, the
  parents of its channels that already serve part of its set take on the whole set.
- ``consistency="expand"``: top-down, a channel's set is widened to cover every kept channel
  above it in its own network (each of which reads it), so nothing is ever cut and every kept
  channel computes exactly what it did in its source network. The price: a network whose top
  channels serve many tasks makes all of them pay for its whole lower stack.

Networks that are not a chain (``resnet``, ``mobilenetv2``): PAM works on *pruning units* of
the group graph (a depthwise conv's channels are its input's, an addition's are both addends'),
so a unit's channels are decided once, on its deepest layer, and every member gets the same
groups. The wiring rule is met at every dense read (a conv reading any earlier layer, a head),
to a fixpoint: in a residual stage the unit of the additions both feeds and is fed by the convs
between them.

With ``own_task`` (default) a kept channel of task t's network always includes t. A task whose
every channel is kept, readable and uncut gets exactly its single-task outputs before any
fine-tuning; those tasks are listed in ``meta["pam"]["exact_tasks"]`` (with ``expand`` and
``drop_irrelevant=False``, all of them). Groups no block above may read are removed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import torch
from torch import Tensor

from merging.data.base import MultitaskData
from merging.errors import MergingError, invariant
from merging.graph import GroupKey
from merging.mergers.base import (
    Merger,
    check_mergeable,
    create_merger,
    register_merger,
    single_block,
)
from merging.mergers.pam_info import PrefixInfo
from merging.mergers.pam_sets import Channel, cap_paths, cut_sets, expand_sets, reproduces
from merging.mi import DEFAULT_NOISE, label_entropy, mutual_information_many
from merging.network import MultitaskNet
from merging.pruning.surgery import remove_dead_groups

Split = Literal["general", "two-level"]
Consistency = Literal["cut", "expand"]


@dataclass(frozen=True)
class PamConfig:
    min_keep: float = 0.25  # each task keeps at least this share of its own network's width per layer
    calib_size: int = 384  # calibration images drawn (seeded) from the training split
    delta: float = 0.001  # a task's relevant set keeps (1 - delta) of the layer's information about it
    noise: float = DEFAULT_NOISE  # kernel variance per z-scored dimension of the MI estimate
    pool: int = 2  # conv maps are average-pooled to at most pool x pool before the estimate
    split: Split = "general"  # "general": group = exact relevance set; "two-level": shared | exclusive
    share_first: bool = True  # rank channels other tasks already keep first
    own_first: bool = True  # then the task's own network's channels (its head reads them), then the rest
    own_task: bool = True  # a kept channel of t's network always serves t (keeps t exact)
    drop_irrelevant: bool = True  # False: a channel relevant to nothing stays in its own task's group
    consistency: Consistency = "cut"  # how sets are made to obey the wiring rule (see the module docstring)


@register_merger
class PamMerger(Merger):
    name = "pam"

    def __init__(self, config: PamConfig | None = None, **options: object) -> None:
        try:
            self.config = config or PamConfig(**options)  # type: ignore[arg-type]
        except TypeError as e:
            raise MergingError("bad_argument", f"pam merger: {e}") from e
        if not 0.0 <= self.config.min_keep <= 1.0:
            raise MergingError("bad_argument", f"pam merger: min_keep must be in [0, 1], got {self.config.min_keep}")
        if not 0.0 <= self.config.delta < 1.0:
            raise MergingError("bad_argument", f"pam merger: delta must be in [0, 1), got {self.config.delta}")
        if self.config.consistency not in ("cut", "expand"):
            raise MergingError("bad_argument", f"pam: consistency is cut or expand, not {self.config.consistency}")
        if self.config.split not in ("general", "two-level"):
            raise MergingError("bad_argument", f"pam merger: split is general or two-level, not {self.config.split}")

    def larger(self) -> Merger | None:
        """Twice the per-task floor, up to the whole network: the floor is a guess at the capacity a
        task needs, which calibration information cannot tell; the pruner's budget can. Past the
        whole network, no regrouping met the budget: keep the networks apart (``separate``, exact,
        so within any budget). An exact regrouping (``expand``, nothing dropped) would also start
        within budget, but its groups read every superset group below, zero weights included:
        measured on digits, 4.2M MACs for all tasks against 1.0M kept apart."""
        cfg = self.config
        if cfg.min_keep < 1.0:
            return PamMerger(replace(cfg, min_keep=min(1.0, 2 * cfg.min_keep)))
        return create_merger("separate")

    # ------------------------------------------------------------------ grouping
    def relevance(self, nets: Sequence[MultitaskNet], data: MultitaskData, seed: int = 0) -> list[list[Channel]]:
        """Channels of every layer with their relevance and final group masks.

        The layers of one pruning unit (the same channels through depthwise convs and additions)
        share one list: their channels are decided once, on the unit's deepest layer (an
        addition's output holds both addends).
        """
        cfg = self.config
        tasks = [net.task_names[0] for net in nets]
        gen = torch.Generator().manual_seed(seed)
        n = min(cfg.calib_size, len(data))
        idx = torch.randperm(len(data), generator=gen)[:n]
        x = data.x[idx]
        labels = [data.y[t][idx] for t in tasks]
        acts = [_layer_outputs(net, x) for net in nets]
        structure = _Structure.of(nets[0])
        layers: list[list[Channel]] = [[] for _ in nets[0].layout]
        for unit in structure.units:
            feats = []
            chans: list[Channel] = []
            for i in range(len(nets)):
                a = acts[i][unit[-1]]
                p = min(cfg.pool, a.shape[-2]), min(cfg.pool, a.shape[-1])
                feats.append(torch.nn.functional.adaptive_avg_pool2d(a, p).flatten(2))
                chans.extend(Channel(i, j) for j in range(a.shape[1]))
            for l in unit:
                layers[l] = chans
            self._relevant_sets(torch.cat(feats, 1), labels, chans)
        if cfg.consistency == "expand":
            expand_sets(layers, structure.reads, len(nets))
        else:
            cut_sets(layers, structure.reads)
        return layers

    def _relevant_sets(self, feats: Tensor, labels: list[Tensor], chans: list[Channel]) -> None:
        cfg = self.config
        single = torch.tensor([mutual_information_many(feats[:, c], labels, cfg.noise) for c in range(len(chans))])
        chosen = torch.zeros(len(chans), dtype=torch.bool)
        # Hardest task first (most label entropy): its channels form the core that easier tasks reuse.
        for t in sorted(range(len(labels)), key=lambda t: (-label_entropy(labels[t]), t)):
            lab = labels[t]
            # Rank by own information about t, tie-broken by index for determinism.
            def rank(c: int, t: int = t) -> tuple[int, float, int]:
                tier = 0 if cfg.share_first and bool(chosen[c]) else 1 if cfg.own_first and chans[c].net == t else 2
                return tier, -float(single[c, t]), c

            order = sorted(range(len(chans)), key=rank)
            own = [c for c in order if chans[c].net == t]
            reuse = [c for c in order if rank(c)[0] == 0]
            probe = PrefixInfo(feats, lab, cfg.noise)
            # The target is what t's *own* network knows at this layer: against the pooled layer of all
            # networks, t's own channels never reached it and the prefix absorbed foreign channels.
            own_by_info = sorted(own, key=lambda c: (-float(single[c, t]), c))
            target = (1.0 - cfg.delta) * probe.best(own_by_info)
            # Reuse what other tasks keep if that alone suffices within t's own width, else t's own
            # channels (which reach the target by construction): t's path is never wider than its network.
            picked = probe.smallest_prefix(reuse, target) if reuse else None
            if picked is None or len(picked) > len(own):
                picked = probe.smallest_prefix(own_by_info, target)
            invariant(picked is not None, "a task's own channels reach their own best prefix")
            # Information on a calibration batch saturates long before accuracy does (a binary task's
            # label is "known" from 2-3 neurons): keep a floor of capacity, from t's own channels only.
            floor = math.ceil(cfg.min_keep * len(own))
            if picked is not None and len(picked) < floor:
                taken = set(picked)
                picked = picked + [c for c in own_by_info if c not in taken][: floor - len(picked)]
            for c in picked or []:
                chans[c].relevant |= 1 << t
                chosen[c] = True
        cap_paths(chans, single, len(labels), cfg.own_task)
        full = (1 << len(labels)) - 1
        for ch in chans:
            if cfg.split == "two-level" and bin(ch.relevant).count("1") >= 2:
                ch.relevant = full
            if ch.relevant == 0 and not cfg.drop_irrelevant:
                ch.relevant = 1 << ch.net
            if ch.relevant and cfg.own_task:
                ch.relevant |= 1 << ch.net
            if cfg.split == "two-level" and ch.relevant != full and bin(ch.relevant).count("1") >= 2:
                ch.relevant = full  # own_task may have made a single-task channel a two-task one

    # ------------------------------------------------------------------ merging
    def merge(self, nets: Sequence[MultitaskNet], data: MultitaskData, seed: int = 0) -> MultitaskNet:
        check_mergeable(nets)
        tasks = [net.tasks[0] for net in nets]
        names = [t.name for t in tasks]
        missing = [t for t in names if t not in data.y]
        if missing:
            raise MergingError("bad_data", f"pam needs labels of every task on the calibration data; missing {missing}")
        layers = self.relevance(nets, data, seed)
        for t in range(len(nets)):
            if not any(ch.final >> t & 1 for ch in layers[-1]):
                raise MergingError("pam_empty_task", f"pam kept no last-layer channel for task {names[t]!r}")
        # Channels of a group in (source network, index) order.
        members: list[dict[int, list[Channel]]] = []
        for chans in layers:
            groups: dict[int, list[Channel]] = {}
            for ch in chans:
                if ch.final:
                    groups.setdefault(ch.final, []).append(ch)
            members.append(dict(sorted(groups.items())))
        layout = [{m: len(g) for m, g in groups.items()} for groups in members]
        reads = _Structure.of(nets[0]).reads
        exact = [names[t] for t in range(len(nets)) if reproduces(layers, reads, t)]
        meta = {
            "merger": self.name,
            "pam": {
                "config": asdict(self.config),
                "seed": seed,
                "exact_tasks": exact,
                "dropped": [sum(1 for ch in chans if not ch.final) for chans in layers],
            },
        }
        merged = MultitaskNet(tasks, nets[0].arch, layout, meta=meta)
        _copy_weights(merged, nets, members)
        # A group no block above may read (no subset group above it) would be computed for nothing.
        merged.meta["pam"]["dead_groups"] = len(remove_dead_groups(merged))
        merged.eval()
        return merged


@dataclass(frozen=True)
class _Structure:
    """What PAM walks, from the group graph of a single-task network: the pruning units (layer
    indices, shallowest first) and every dense read (reader layer, layer read), in execution
    order. For a chain: one unit per layer and reads (l, l - 1)."""

    units: tuple[tuple[int, ...], ...]
    reads: tuple[tuple[int, int], ...]

    @staticmethod
    def of(net: MultitaskNet) -> _Structure:
        graph = net.graph()
        units = tuple(tuple(k.layer for k in unit) for unit in graph.units())
        reads = tuple((n.key.layer, i.layer) for n in graph if isinstance(n.key, GroupKey) and not n.coupled
                      for i in n.inputs)
        return _Structure(units, reads)


@torch.no_grad()
def _layer_outputs(net: MultitaskNet, x: Tensor) -> list[Tensor]:
    """The output of every trunk layer of a single-task network on ``x``."""
    net.eval()
    outs: dict[int, Tensor] = {}
    hooks = [single_block(net, l).register_forward_hook(
        lambda _m, _i, out, l=l: outs.__setitem__(l, out)) for l in range(len(net.layout))]
    try:
        net(x)
    finally:
        for h in hooks:
            h.remove()
    return [outs[l] for l in range(len(net.layout))]


@torch.no_grad()
def _copy_weights(merged: MultitaskNet, nets: Sequence[MultitaskNet], members: list[dict[int, list[Channel]]]) -> None:
    """Block-diagonal union: each channel keeps its weights on its own network's channels, zero elsewhere
    (a depthwise channel keeps its filter; an addition has none). Copied one source network at a time
    (index tensors, not element by element: a 1x1 conv of a MobileNetV2 has 10^5 weights)."""
    for l, groups in enumerate(members):
        r = merged.resolved[l]
        if r.kind == "add":
            continue  # no weights: it sums the unit's channels
        for mask, chans in groups.items():
            block: Any = merged.block(l, mask)
            w = torch.zeros_like(block.conv.weight)
            # the image, or a depthwise conv: a channel's filter reads only its own input channel
            flat = r.source < 0 or r.kind == "dw"
            inputs = [] if flat else [ch for m in merged.reads[(l, mask)] for ch in members[r.source][m]]
            for i in sorted({ch.net for ch in chans}):
                src: Any = single_block(nets[i], l)
                rows = torch.tensor([row for row, ch in enumerate(chans) if ch.net == i])
                idx = torch.tensor([ch.index for ch in chans if ch.net == i])
                if flat:
                    w[rows] = src.conv.weight[idx]
                else:
                    cols = torch.tensor([col for col, p in enumerate(inputs) if p.net == i], dtype=torch.long)
                    pidx = torch.tensor([p.index for p in inputs if p.net == i], dtype=torch.long)
                    w[rows.unsqueeze(1), cols] = src.conv.weight[idx.unsqueeze(1), pidx]
                if block.conv.bias is not None:
                    block.conv.bias[rows] = src.conv.bias[idx]
                if block.bn is not None:
                    for name in ("weight", "bias", "running_mean", "running_var"):
                        getattr(block.bn, name)[rows] = getattr(src.bn, name)[idx]
            block.conv.weight.copy_(w)
    last = members[-1]
    for t, task in enumerate(merged.task_names):
        head: Any = merged.heads[task]
        src_head: Any = nets[t].heads[task]
        inputs = [ch for m in merged.head_reads(t) for ch in last[m]]
        w = torch.zeros_like(head.conv.weight)
        cols = torch.tensor([col for col, ch in enumerate(inputs) if ch.net == t], dtype=torch.long)
        w[:, cols] = src_head.conv.weight[:, torch.tensor([ch.index for ch in inputs if ch.net == t], dtype=torch.long)]
        head.conv.weight.copy_(w)
        if head.conv.bias is not None:
            head.conv.bias.copy_(src_head.conv.bias)
