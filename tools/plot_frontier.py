#!/usr/bin/env python3
"""Frontier plot of `sparse-attn eval --plot` and `sparse-attn frontier`.

Usage: plot_frontier.py IN.json OUT.png

Reads the "panels" of the tool's JSON: each panel is one (dataset, phase) with one series per method
(achieved CR, relative L2 error of the output vs dense, whether the target CR was reachable) and the
method's fit log(err) = a + b log(CR) + c log(n). Draws error (log) against achieved CR (log), the
dense point at CR 1 (error 0, drawn at the panel's floor), and the 1% / 5% error levels.
The sparse-attn binary embeds this script; it is also usable on its own with python3 + matplotlib.
"""
import json
import math
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MARKERS = "osD^vP*Xh<>p"


def fit_label(fit):
    if not fit or fit.get("a") is None or fit.get("b") is None:
        return ""
    txt = " b=%.2f" % fit["b"]
    if fit.get("length_term") and fit.get("c") is not None:
        txt += " c=%.2f" % fit["c"]
    if fit.get("r2") is not None:
        txt += " R\N{SUPERSCRIPT TWO}=%.2f" % fit["r2"]
    return txt


def fit_line(ax, panel, fit, xs, color):
    """The fit's line over the series' CR range: a + b log(CR), plus c log(n) only where the
    length term was fitted (a single sequence length has none: c is null)."""
    if not fit or fit.get("a") is None or fit.get("b") is None or len(xs) < 2 or min(xs) <= 0:
        return
    if max(xs) / min(xs) <= 1.0:
        return
    c = fit.get("c") if fit.get("length_term") else None
    n = panel.get("tokens") or 1
    gx = [min(xs) * (max(xs) / min(xs)) ** (k / 20.0) for k in range(21)]
    gy = []
    for x in gx:
        y = fit["a"] + fit["b"] * math.log(x)
        if c is not None and n > 0:
            y += c * math.log(n)
        if not math.isfinite(y) or y > 700:  # beyond float range: no line
            return
        gy.append(math.exp(y))
    ax.plot(gx, gy, ls=":", lw=1.0, color=color)


def draw_panel(ax, panel):
    floor = panel.get("dense_error_floor", 1e-4)
    lo, hi = floor, floor * 10
    for i, s in enumerate(panel["series"]):
        pts = [(c, e, r) for c, e, r in zip(s["cr"], s["err"], s["reachable"])
               if c is not None and e is not None and c > 0 and e > 0]
        if not pts:
            continue
        pts.sort()
        xs = [p[0] for p in pts]
        ys = [p[1] for p in pts]
        hi = max(hi, max(ys))
        lo = min(lo, min(ys))
        line, = ax.plot(xs, ys, marker=MARKERS[i % len(MARKERS)], ms=5, lw=1.4,
                        label=s["method"] + fit_label(s.get("fit")))
        unreached = [(p[0], p[1]) for p in pts if not p[2]]
        if unreached:  # target CR clamped: hollow marker
            ax.plot([u[0] for u in unreached], [u[1] for u in unreached], ls="none",
                    marker=MARKERS[i % len(MARKERS)], ms=9, mfc="none", mec=line.get_color())
        fit_line(ax, panel, s.get("fit"), xs, line.get_color())
    ax.plot([1.0], [floor], marker="*", ms=13, color="black", ls="none",
            label="dense (error 0, drawn at %.0e)" % floor)
    for level, name in ((0.01, "1%"), (0.05, "5%")):
        ax.axhline(level, color="grey", lw=0.7, ls="--")
        ax.text(1.02, level, name, color="grey", fontsize=7, va="bottom")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(lo / 2, hi * 2)
    ax.set_xlabel("achieved compression ratio (dense pairs / computed pairs)")
    ax.set_ylabel("relative L2 error of the output vs dense")
    ax.set_title(panel["title"], fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=6.5, loc="lower right")


def main():
    if len(sys.argv) != 3:
        sys.stderr.write(__doc__)
        return 2
    with open(sys.argv[1], encoding="utf-8") as f:
        doc = json.load(f)
    panels = doc["panels"]
    if not panels:
        sys.stderr.write("plot_frontier.py: no panels in %s\n" % sys.argv[1])
        return 2
    cols = 2 if len(panels) > 1 else 1
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(7.0 * cols, 5.2 * rows), squeeze=False)
    for ax, panel in zip([a for r in axes for a in r], panels):
        draw_panel(ax, panel)
    for ax in [a for r in axes for a in r][len(panels):]:
        ax.axis("off")
    fig.suptitle(doc.get("title", "sparse-attn: error vs compression"), fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(sys.argv[2], dpi=110, format="png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
