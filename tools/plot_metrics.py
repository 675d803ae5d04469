#!/usr/bin/env python
"""Draw learning curves (total loss; COCO AP and AP50) from detectron2 `metrics.json` files into a PNG.

    python tools/plot_metrics.py output/synthetic/metrics.json --output output/synthetic/learning_curve.png
    python tools/plot_metrics.py a/metrics.json b/metrics.json --label A --label B --x minutes --output ab.png

Several files draw several runs in one figure. `--x minutes` puts the evaluations at the wall time since training
started (`wall/minutes`, written by tools/train_net.py with every evaluation), to compare runs at equal time.
"""
import argparse
import json
import os
import sys

WALL = "wall/minutes"


def read_metrics(path):
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON line ({e.msg})") from None
    if not rows:
        raise ValueError(f"{path}: no metrics in this file")
    return rows


def evaluations(rows, path, x="iteration"):
    """[(x, AP, AP50)] of the rows with a COCO evaluation; x is the iteration or `wall/minutes`."""
    evals = [r for r in rows if "bbox/AP" in r]
    if x == "minutes":
        if any(WALL not in r for r in evals):
            raise ValueError(f"{path}: an evaluation has no {WALL!r} (written by tools/train_net.py); use --x iteration")
        return [(r[WALL], r["bbox/AP"], r["bbox/AP50"]) for r in evals]
    return [(r["iteration"], r["bbox/AP"], r["bbox/AP50"]) for r in evals]


def plot(runs, output, title="", x="iteration"):
    """`runs`: [(label, rows, path)]; one line per run and metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(11, 4))
    several = len(runs) > 1
    for n, (label, rows, path) in enumerate(runs):
        color = f"C{n}" if several else None
        loss = [(r["iteration"], r["total_loss"]) for r in rows if "total_loss" in r]
        if loss:
            ax_loss.plot(*zip(*loss), color=color or "tab:gray", label=label if several else None)
        ap = evaluations(rows, path, x)
        if ap:
            xs, a, a50 = zip(*ap)
            name = f"{label} " if several else ""
            ax_ap.plot(xs, a50, "o-", color=color, label=f"{name}AP50")
            ax_ap.plot(xs, a, "s--" if several else "s-", color=color, label=f"{name}AP")
    ax_loss.set(xlabel="iteration", ylabel="total loss (weighted, all decoder layers)", title="training loss")
    if several:
        ax_loss.legend(loc="upper right")
    ax_ap.legend(loc="lower right")
    xlabel = "wall time since training started (min)" if x == "minutes" else "iteration"
    ax_ap.set(xlabel=xlabel, ylabel="COCO bbox metric (%)", title="validation (COCOEvaluator)", ylim=(0, 100))
    ax_ap.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(output, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", nargs="+", help="detectron2 metrics.json, one per run")
    parser.add_argument("--output", required=True, help="PNG to write")
    parser.add_argument("--label", action="append", default=[], help="a run's name, once per file, in order")
    parser.add_argument("--x", choices=("iteration", "minutes"), default="iteration", help="the AP panel's x axis")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    if args.label and len(args.label) != len(args.metrics):
        parser.error(f"--label: {len(args.label)} labels for {len(args.metrics)} metrics files")
    labels = args.label or [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in args.metrics]
    try:
        runs = [(label, read_metrics(path), path) for label, path in zip(labels, args.metrics)]
        plot(runs, args.output, args.title, args.x)
    except (OSError, ValueError, KeyError) as e:
        print(f"plot_metrics: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
