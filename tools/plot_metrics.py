#!/usr/bin/env python
"""Draw a learning curve (total loss; COCO AP and AP50) from a detectron2 `metrics.json` into a PNG.

    python tools/plot_metrics.py output/synthetic/metrics.json --output output/synthetic/learning_curve.png
"""
import argparse
import json
import sys


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


def plot(rows, output, title=""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss = [(r["iteration"], r["total_loss"]) for r in rows if "total_loss" in r]
    ap = [(r["iteration"], r["bbox/AP"], r["bbox/AP50"], r.get("elapsed_min")) for r in rows if "bbox/AP" in r]
    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(11, 4))
    if loss:
        ax_loss.plot(*zip(*loss), color="tab:gray")
    ax_loss.set(xlabel="iteration", ylabel="total loss (weighted, all decoder layers)", title="training loss")
    if ap:
        it, a, a50, minutes = zip(*ap)
        ax_ap.plot(it, a50, "o-", label="AP50")
        ax_ap.plot(it, a, "s-", label="AP")
        for x, y, m in zip(it, a50, minutes):
            if m is not None:
                ax_ap.annotate(f"{m:.1f} min", (x, y), textcoords="offset points", xytext=(0, 6), fontsize=7,
                               ha="center")
        ax_ap.legend(loc="lower right")
    ax_ap.set(xlabel="iteration", ylabel="COCO bbox metric (%)", title="validation (COCOEvaluator)", ylim=(0, 100))
    ax_ap.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(output, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", help="detectron2 metrics.json")
    parser.add_argument("--output", required=True, help="PNG to write")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    try:
        plot(read_metrics(args.metrics), args.output, args.title)
    except (OSError, ValueError, KeyError) as e:
        print(f"plot_metrics: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
