#!/usr/bin/env python3
"""Plots sparse_attn_bench results (Google Benchmark JSON) into PNGs.

    sparse_attn_bench --full --benchmark_out=full.json --benchmark_out_format=json
    python3 benchmarks/plot.py full.json [more.json ...] -o plots/

Figures (one per phase and K/V dtype where it applies):
  latency_<phase>_<dtype>.png   time per call vs n, log-log, one line per method and CR, with the
                                dense cost guide (prefill O(n^2), decode O(n)) and ideal dense/CR
  speedup_<phase>_<dtype>.png   speed-up over dense vs achieved CR, one panel per n, ideal y = x
  decode_bandwidth_<dtype>.png  decode GB/s vs n per method, with the stream_read roofline
  fma_fraction.png              prefill GFLOP/s / fma_peak vs n per method (eigen_gemm for scale)
Needs numpy and matplotlib (Debian: python3-numpy python3-matplotlib).
"""
import argparse
import json
import math
import os
import statistics
import sys
from collections import defaultdict

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
except ImportError as e:  # pragma: no cover - environment dependent
    sys.exit(f"plot.py needs numpy and matplotlib ({e}); Debian: apt-get install python3-numpy "
             "python3-matplotlib")

TIME_UNIT_S = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}


def parse_name(name):
    """'prefill/block_sparse/n:4096/cr:10/bf16' -> dict(phase, method, n, cr, dtype, tag)."""
    parts = name.split("/")
    rec = {"phase": parts[0], "method": parts[1] if len(parts) > 1 else "", "dtype": None,
           "n": None, "tag": None}
    for p in parts[2:]:
        if ":" in p:
            k, v = p.split(":", 1)
            try:
                rec[k] = float(v) if k != "n" else int(v)
            except ValueError:
                rec[k] = v
            if k not in ("n",):
                rec["tag"] = p
        elif p in ("fp32", "bf16", "fp16"):
            rec["dtype"] = p
    return rec


def load(paths):
    """Benchmark runs by name (repetitions reduced to their median), plus the JSON contexts."""
    runs = defaultdict(list)
    contexts = []
    for path in paths:
        with open(path) as f:
            data = json.load(f)  # Python's json accepts Google Benchmark's bare NaN / Infinity
        contexts.append(data.get("context", {}))
        for b in data.get("benchmarks", []):
            if b.get("run_type") == "aggregate" or b.get("error_occurred"):
                continue
            runs[b["name"]].append(b)
    out = {}
    for name, bs in runs.items():
        rec = parse_name(name)
        rec["name"] = name
        rec["seconds"] = statistics.median(
            b["real_time"] * TIME_UNIT_S.get(b.get("time_unit", "ns"), 1e-9) for b in bs)
        keys = set().union(*(b.keys() for b in bs))
        for k in keys:
            vals = [b[k] for b in bs if isinstance(b.get(k), (int, float)) and not isinstance(b.get(k), bool)]
            if vals and k not in ("real_time", "cpu_time", "iterations", "family_index",
                                  "per_family_instance_index", "repetitions", "repetition_index",
                                  "threads"):
                rec[k] = statistics.median(vals)
        out[name] = rec
    return out, contexts


def roofline(runs, key):
    vals = [r.get(key) for n, r in runs.items() if n.startswith("roofline/") and r.get(key)]
    return vals


def tag_key(label):
    """Sort key: 'block_sparse cr:10' after 'block_sparse cr:2' (numbers compared as numbers)."""
    out = []
    for part in str(label).replace(":", " ").split():
        try:
            out.append((1, float(part), ""))
        except ValueError:
            out.append((0, 0.0, part))
    return out


def series_label(r):
    return f"{r['method']} {r['tag']}" if r.get("tag") and r["method"] != "dense" else r["method"]


def plot_latency(runs, outdir, written):
    groups = defaultdict(list)
    for r in runs.values():
        if r["phase"] in ("prefill", "decode") and r.get("n") and r.get("dtype"):
            groups[(r["phase"], r["dtype"])].append(r)
    for (phase, dtype), rs in sorted(groups.items()):
        series = defaultdict(list)
        for r in rs:
            series[series_label(r)].append(r)
        fig, ax = plt.subplots(figsize=(8, 6))
        for label, pts in sorted(series.items(), key=lambda kv: tag_key(kv[0])):
            pts.sort(key=lambda r: r["n"])
            ax.plot([p["n"] for p in pts], [p["seconds"] * 1e3 for p in pts], "o-", label=label,
                    lw=2.0 if label == "dense" else 1.0, ms=3)
        dense = sorted((r for r in rs if r["method"] == "dense"), key=lambda r: r["n"])
        if dense:
            ns = np.array(sorted({r["n"] for r in rs}), dtype=float)
            n0, t0 = dense[0]["n"], dense[0]["seconds"] * 1e3
            power = 2.0 if phase == "prefill" else 1.0
            guide = t0 * (ns / n0) ** power
            ax.plot(ns, guide, "k--", lw=1, label=f"dense O(n^{power:g}) guide")
            crs = sorted({r["cr"] for r in rs if isinstance(r.get("cr"), float) and r["cr"] > 1})
            for cr in crs:
                ax.plot(ns, guide / cr, ":", color="gray", lw=0.8)
                ax.annotate(f"1/{cr:g}", (ns[-1], guide[-1] / cr), fontsize=7, color="gray")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("n (tokens)")
        ax.set_ylabel("time per call (ms)" if phase == "prefill" else "time per decode step (ms)")
        ax.set_title(f"{phase} latency, K/V {dtype} (dotted: ideal dense / CR)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        path = os.path.join(outdir, f"latency_{phase}_{dtype}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)


def plot_speedup(runs, outdir, written):
    groups = defaultdict(list)
    for r in runs.values():
        if r["phase"] in ("prefill", "decode") and r.get("speedup_vs_dense") and r.get("achieved_cr"):
            groups[(r["phase"], r["dtype"])].append(r)
    for (phase, dtype), rs in sorted(groups.items()):
        ns = sorted({r["n"] for r in rs})
        cols = min(3, len(ns))
        rows = math.ceil(len(ns) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), squeeze=False)
        for ax, n in zip(axes.flat, ns):
            by_method = defaultdict(list)
            for r in rs:
                if r["n"] == n and r["method"] != "dense":
                    by_method[r["method"]].append(r)
            top = 1.0
            for m, pts in sorted(by_method.items()):
                pts.sort(key=lambda r: r["achieved_cr"])
                xs = [p["achieved_cr"] for p in pts]
                ax.plot(xs, [p["speedup_vs_dense"] for p in pts], "o-", label=m, ms=4)
                top = max(top, max(xs))
            xs = np.array([1.0, top])
            ax.plot(xs, xs, "k--", lw=1, label="ideal (= CR)")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"n = {n}")
            ax.set_xlabel("achieved CR")
            ax.set_ylabel("speed-up vs dense")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(ns):]:
            ax.axis("off")
        fig.suptitle(f"{phase}: speed-up over dense vs compression, K/V {dtype} "
                     "(selection cost included)")
        path = os.path.join(outdir, f"speedup_{phase}_{dtype}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)


def plot_decode_bandwidth(runs, outdir, written):
    """One panel per decode method (its CRs as lines, dense for reference), stream_read line."""
    stream = roofline(runs, "GBps")
    groups = defaultdict(lambda: defaultdict(list))
    for r in runs.values():
        if r["phase"] == "decode" and r.get("GBps") and r.get("n"):
            groups[r["dtype"]][r["method"]].append(r)
    for dtype, by_method in sorted(groups.items()):
        dense = sorted(by_method.get("dense", []), key=lambda r: r["n"])
        methods = sorted(m for m in by_method if m != "dense") or ["dense"]
        cols = min(3, len(methods))
        nrows = math.ceil(len(methods) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols, 4.2 * nrows), squeeze=False)
        for ax, method in zip(axes.flat, methods):
            series = defaultdict(list)
            for r in by_method[method]:
                series[r.get("tag") or method].append(r)
            for tag, pts in sorted(series.items(), key=lambda kv: tag_key(kv[0])):
                pts.sort(key=lambda r: r["n"])
                ax.plot([p["n"] for p in pts], [p["GBps"] for p in pts], "o-", ms=3, label=tag)
            if dense and method != "dense":
                ax.plot([p["n"] for p in dense], [p["GBps"] for p in dense], "k-", lw=2, label="dense")
            if stream:
                ax.axhline(max(stream), color="k", ls="--", lw=1,
                           label=f"stream_read {max(stream):.1f} GB/s")
            ax.set_xscale("log", base=2)
            ax.set_ylim(bottom=0)
            ax.set_xlabel("n (cached tokens)")
            ax.set_ylabel("GB/s read (K/V + selection metadata)")
            ax.set_title(method)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(methods):]:
            ax.axis("off")
        fig.suptitle(f"decode bandwidth, K/V {dtype} (above the stream line: cache-resident data)")
        path = os.path.join(outdir, f"decode_bandwidth_{dtype}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)


def plot_fma_fraction(runs, outdir, written, cr_pick=10.0):
    """Dense and every method at one CR (cr_pick if run, else its largest) per K/V dtype."""
    fma = runs.get("roofline/fma_peak", {}).get("GFLOPs")
    if not fma:
        print("plot.py: no roofline/fma_peak in the input; skipping fma_fraction.png",
              file=sys.stderr)
        return
    by_dtype = defaultdict(lambda: defaultdict(list))
    for r in runs.values():
        if r["phase"] == "prefill" and r.get("GFLOPs") and r.get("n") and r.get("dtype"):
            by_dtype[r["dtype"]][r["method"]].append(r)
    if not by_dtype:
        return
    dtypes = sorted(by_dtype)
    fig, axes = plt.subplots(1, len(dtypes), figsize=(7 * len(dtypes), 5.5), squeeze=False)
    for ax, dtype in zip(axes.flat, dtypes):
        for method, pts in sorted(by_dtype[dtype].items()):
            crs = sorted({p["cr"] for p in pts if isinstance(p.get("cr"), float)})
            if method == "dense" or not crs:
                chosen = pts
            else:
                cr = cr_pick if cr_pick in crs else crs[-1]
                chosen = [p for p in pts if p.get("cr") == cr]
            chosen.sort(key=lambda r: r["n"])
            label = method if method == "dense" else series_label(chosen[0])
            ax.plot([p["n"] for p in chosen], [p["GFLOPs"] / fma for p in chosen], "o-", ms=3,
                    label=label, lw=2.5 if method == "dense" else 1.0,
                    color="k" if method == "dense" else None)
        for name, r in sorted(runs.items()):
            if name.startswith("roofline/eigen_gemm") and r.get("GFLOPs"):
                y = r["GFLOPs"] / fma
                ax.axhline(y, ls=":", lw=1, color="gray")
                ax.annotate(name.replace("roofline/", ""), xy=(0.01, y), xycoords=("axes fraction", "data"),
                            xytext=(0, 2), textcoords="offset points", fontsize=7, color="gray")
        ax.axhline(1.0, color="k", ls="--", lw=1, label=f"fma_peak {fma:.0f} GFLOP/s")
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("n (tokens)")
        ax.set_ylabel("useful GFLOP/s / fma_peak")
        ax.set_title(f"K/V {dtype}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("prefill: fraction of this machine's fp32 FMA peak (useful FLOPs = 4 x pairs x d; "
                 "dotted: Eigen sgemm)")
    path = os.path.join(outdir, "fma_fraction.png")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="+", help="Google Benchmark JSON file(s) from sparse_attn_bench")
    ap.add_argument("-o", "--outdir", default="bench_plots", help="output folder (default: bench_plots)")
    args = ap.parse_args(argv)
    runs, contexts = load(args.json)
    if not runs:
        sys.exit("plot.py: no benchmark results in the input")
    os.makedirs(args.outdir, exist_ok=True)
    written = []
    plot_latency(runs, args.outdir, written)
    plot_speedup(runs, args.outdir, written)
    plot_decode_bandwidth(runs, args.outdir, written)
    plot_fma_fraction(runs, args.outdir, written)
    threads = sorted({c.get("sparse_attn_threads", "?") for c in contexts})
    print(f"plot.py: {len(runs)} results (threads: {', '.join(threads)}) -> {len(written)} figures")
    for p in written:
        print("  " + p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
