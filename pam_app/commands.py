"""``pam demo`` (parser side light: the demo imports every layer when it runs)."""

from __future__ import annotations

import argparse
from typing import Any

SCHEDULE_HELP = ("pruning schedule of the route, the specialist and each task alone (one for all, so the comparison "
                 "is of structures): baseline (10%% steps down to 2%%, 5+15 epochs; default), b128 (the same in "
                 "batches of 128 with the retry in 3 judged parts: about 3/4 the time on 8x8 digits, none saved on "
                 "larger networks, merged routes measured 1.04-1.24x dearer) or fast (15%% steps down to 4%%, 3+9 "
                 "epochs: weaker)")

USER_ERRORS: tuple[type[BaseException], ...] = ()


def cmd_demo(args: argparse.Namespace) -> int:
    from pam_app.demo import run_demo

    return run_demo(args)


def cmd_budget_study(args: argparse.Namespace) -> int:
    from pam_app.budget_study import main_study

    return main_study(args)


def cmd_distill_study(args: argparse.Namespace) -> int:
    from pam_app.distill_study import main_distill

    return main_distill(args)


def cmd_bench_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pam_app.train_bench import run

    run(n=args.images, size=args.size, repeats=args.repeats, out_dir=Path(args.out_dir))
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from pam_app.compress import cmd_compress as run

    return run(args)


def register(sub: Any) -> None:
    from pam_app.commands_merging import add_dataset_args

    c = sub.add_parser("compress", help="merge + prune a zoo by any route the benchmark measures "
                       "(<merger>[+regroup], with the merge ladder and the never-dearer rule)")
    c.add_argument("--zoo", required=True, help="zoo directory (from `pam train`)")
    c.add_argument("--route", default="pam",
                   help="separate | shared | mtz | pam, each optionally +regroup (default pam)")
    c.add_argument("--out", required=True, help="output stem (writes STEM.json + STEM.pt)")
    c.add_argument("--budget", type=float, default=1.0, help="max accuracy drop per task, in points")
    c.add_argument("--epochs", type=int, default=15, help="training epochs of a shared trunk (route shared)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--workers", type=int, default=None, help="processes for the independent pruning runs")
    c.add_argument("--schedule", choices=("baseline", "b128", "fast"), default="baseline", help=SCHEDULE_HELP)
    add_dataset_args(c)
    c.set_defaults(func=cmd_compress)

    q = sub.add_parser("budget-study", help="measure the budget rule's false accept/reject rates on glyphs "
                       "against a 50k-image truth split -> results/budget-rule.{json,md}")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--epochs", type=int, default=15, help="zoo training epochs")
    q.add_argument("--draws", type=int, default=300, help="check sets drawn per network, task and size")
    q.add_argument("--routes", default="separate,pam", help="pruning runs whose visited networks are studied")
    q.add_argument("--out-dir", default="results")
    q.set_defaults(func=cmd_budget_study)

    d = sub.add_parser("distill-study", help="a merged network retrained with and without its references as "
                       "teachers: disagreement and certified margin -> results/distill.{json,md}")
    d.add_argument("--datasets", default="digits,glyphs")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--distill", type=float, default=0.5, help="weight of the teachers' term")
    d.add_argument("--out-dir", default="results")
    d.set_defaults(func=cmd_distill_study)

    b = sub.add_parser("bench-train", help="a pam train epoch on a folder of RGB images vs bare training loops "
                       "-> results/train-bench.{json,md}")
    b.add_argument("--images", type=int, default=6000)
    b.add_argument("--size", type=int, default=32)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--out-dir", default="results")
    b.set_defaults(func=cmd_bench_train)

    p = sub.add_parser("demo", help="the main job on generated glyphs (or the bundled digits): train, merge, "
                       "prune, export, serve")
    p.add_argument("--out", default="runs/demo", help="where the demo writes its artifacts")
    p.add_argument("--dataset", default="glyphs", choices=("glyphs", "digits"),
                   help="glyphs: generated, 10,000 check images; digits: the small-data case (359)")
    p.add_argument("--epochs", type=int, default=None, help="zoo epochs (default: 15 on glyphs, 60 on digits)")
    p.add_argument("--workers", type=int, default=None, help="processes for independent jobs (default: one per core)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--route", default=None,
                   help="merger to start from, '+regroup' to prune with regrouping (default: the benchmark's best)")
    p.add_argument("--no-serve", action="store_true", help="stop before serving (for scripts)")
    p.add_argument("--schedule", choices=("baseline", "b128", "fast"), default="baseline", help=SCHEDULE_HELP)
    p.add_argument("--port", type=int, default=8000, help="port to serve the demo bundle on")
    p.set_defaults(func=cmd_demo)
