#!/usr/bin/env python3
"""sparse_attn_bench beside PyTorch CPU attention on the same shapes, over thread counts.

    python3 benchmarks/compare_torch.py --bench build/benchmarks/sparse_attn_bench \
        [--threads 1,4,8,16] [--n 4096] [--decode-n 131072] [--cr 10] [--dtypes fp32,bf16] [-o out/]

Cases (shapes as in sparse_attn_bench: prefill H = 8, d = 128, causal; decode Hq = 32, Hkv = 8,
d = 128, one new token):
  prefill dense           ours: prefill/dense        torch: SDPA is_causal, FlexAttention causal
  prefill sliding_window  ours: prefill/sliding_window  torch: FlexAttention BlockMask (same W, 4 sinks)
  prefill block_sparse    ours: prefill/block_sparse    torch: FlexAttention BlockMask built by the
                          same MInference-style selection in torch (mean-pooled 64-blocks, forced
                          sink/diagonal/previous block, top-k per row with our k); selection timed in
  decode dense            ours: decode/dense         torch: SDPA with enable_gqa (repeat_interleave of
                          K/V where the installed torch lacks it)
Our bf16 rows keep Q in fp32 and K/V in bf16; torch needs one dtype, so its bf16 rows run Q, K and V
in bf16. FlexAttention is compiled (torch.compile); compile time and BlockMask creation are excluded
(a model builds the mask once per shape and reuses it in every layer); the block-sparse selection is
included, as in ours. Prints a markdown table and writes thread_scaling.png (matplotlib).
Skips with a message (exit 0) when PyTorch is not installed.
"""
import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time

HEADS, DIM = 8, 128          # prefill: Hq = Hkv = 8
DEC_HQ, DEC_HKV = 32, 8      # decode
SINKS, BLOCK = 4, 64


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", default=None,
                    help="path to sparse_attn_bench (default: build/benchmarks/sparse_attn_bench)")
    ap.add_argument("--threads", default="1,4,8,16", help="comma-separated thread counts")
    ap.add_argument("--n", type=int, default=4096, help="prefill tokens (a power of two, 1024..65536)")
    ap.add_argument("--decode-n", type=int, default=131072, help="decode cache tokens (4096..131072)")
    ap.add_argument("--cr", type=float, default=10, help="target CR of the sparse cases (1, 2, 5, 10, 20)")
    ap.add_argument("--dtypes", default="fp32,bf16", help="K/V dtypes: fp32, bf16")
    ap.add_argument("--repeats", type=int, default=3, help="timed torch runs per case (median)")
    ap.add_argument("--min-time", type=float, default=0.2, help="--benchmark_min_time for ours")
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention (compiles with the C++ toolchain)")
    ap.add_argument("-o", "--outdir", default="bench_compare", help="output folder for the PNG and JSON")
    return ap.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# Ours: one sparse_attn_bench run per thread count, filtered to the compared shapes
# ------------------------------------------------------------------------------------------------

def our_filter(n, dn, cr, dtypes):
    crs = "1" if cr == 1 else f"(1|{cr:g})"
    dt = "(" + "|".join(dtypes) + ")"
    return (f"^(prefill/(dense|sliding_window|block_sparse)/n:{n}/cr:{crs}/{dt}"
            f"|decode/dense/n:{dn}/cr:1/{dt})$")


def run_ours(bench, threads, args, dtypes):
    cmd = [bench, "--full", "--threads", str(threads), "--no-progress",
           f"--benchmark_filter={our_filter(args.n, args.decode_n, args.cr, dtypes)}",
           "--benchmark_format=json", f"--benchmark_min_time={args.min_time}"]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr.strip()[-500:]}")
    data = json.loads(p.stdout)
    out = {}
    for b in data.get("benchmarks", []):
        if b.get("error_occurred"):
            continue
        unit = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}[b.get("time_unit", "ns")]
        out[b["name"]] = {"ms": b["real_time"] * unit * 1e3, "label": b.get("label", ""),
                          "achieved_cr": b.get("achieved_cr")}
    return out


# ------------------------------------------------------------------------------------------------
# Torch
# ------------------------------------------------------------------------------------------------

def window_for_cr(n, cr, sinks=SINKS):
    """The W whose sliding-window pair count (4 sinks, causal) is closest to dense / cr (as ours)."""
    def pairs(w):
        total = 0
        for p in range(n):
            band = min(p + 1, w)
            s = min(sinks, p + 1)
            overlap = max(0, s - max(0, p - w + 1))
            total += band + s - overlap
        return total
    target = n * (n + 1) / 2 / cr
    lo, hi = 1, n
    while lo < hi:
        mid = (lo + hi) // 2
        if pairs(mid) < target:
            lo = mid + 1
        else:
            hi = mid
    if lo > 1 and abs(pairs(lo - 1) - target) < abs(pairs(lo) - target):
        lo -= 1
    return lo


def timed(fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


class Torch:
    def __init__(self, torch):
        self.torch = torch
        import torch.nn.functional as F
        self.F = F
        self.flex = None
        self.flex_error = None
        try:
            from torch.nn.attention.flex_attention import (BlockMask, create_block_mask,
                                                           flex_attention)
            self.BlockMask, self.create_block_mask = BlockMask, create_block_mask
            self.flex = torch.compile(flex_attention, dynamic=False)
        except Exception as e:  # torch < 2.5, or no compile support
            self.flex_error = f"{type(e).__name__}: {e}"

    def tensors(self, h, n, kv_heads, dtype, seed):
        g = self.torch.Generator().manual_seed(seed)
        mk = lambda heads, toks: self.torch.rand(1, heads, toks, DIM, generator=g, dtype=self.torch.float32) * 2 - 1
        q, k, v = mk(h, n), mk(kv_heads, n), mk(kv_heads, n)
        return q.to(dtype), k.to(dtype), v.to(dtype)

    def sdpa_prefill(self, n, dtype, repeats):
        q, k, v = self.tensors(HEADS, n, HEADS, dtype, 1)
        with self.torch.no_grad():
            return timed(lambda: self.F.scaled_dot_product_attention(q, k, v, is_causal=True), repeats)

    def sdpa_decode(self, n, dtype, repeats):
        g = self.torch.Generator().manual_seed(2)
        q = (self.torch.rand(1, DEC_HQ, 1, DIM, generator=g) * 2 - 1).to(dtype)
        k = (self.torch.rand(1, DEC_HKV, n, DIM, generator=g) * 2 - 1).to(dtype)
        v = (self.torch.rand(1, DEC_HKV, n, DIM, generator=g) * 2 - 1).to(dtype)
        note = "enable_gqa"
        with self.torch.no_grad():
            try:
                self.F.scaled_dot_product_attention(q, k[:, :, :16], v[:, :, :16], enable_gqa=True)
                fn = lambda: self.F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            except TypeError:  # torch < 2.5: expand K/V to every query head (timed: it is the cost)
                G = DEC_HQ // DEC_HKV
                note = "repeat_interleave"
                fn = lambda: self.F.scaled_dot_product_attention(
                    q, k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1))
            return timed(fn, repeats), note

    def flex_run(self, q, k, v, block_mask, repeats, prepare=None):
        if self.flex is None:
            raise RuntimeError(self.flex_error)
        with self.torch.no_grad():
            if prepare is None:
                return timed(lambda: self.flex(q, k, v, block_mask=block_mask), repeats)
            return timed(lambda: self.flex(q, k, v, block_mask=prepare()), repeats)

    def flex_causal(self, n, dtype, repeats):
        q, k, v = self.tensors(HEADS, n, HEADS, dtype, 1)
        causal = lambda b, h, qi, ki: qi >= ki
        bm = self.create_block_mask(causal, None, None, n, n, device="cpu")
        return self.flex_run(q, k, v, bm, repeats)

    def flex_sliding_window(self, n, w, dtype, repeats):
        q, k, v = self.tensors(HEADS, n, HEADS, dtype, 1)

        def sw(b, h, qi, ki):
            return (qi >= ki) & ((ki < SINKS) | (qi - ki < w))
        bm = self.create_block_mask(sw, None, None, n, n, device="cpu")
        return self.flex_run(q, k, v, bm, repeats)

    def block_sparse_mask(self, q, k, top_k):
        """MInference block selection in torch: [1, H, nb, nb] block scores of mean-pooled 64-blocks,
        block-causal, forced block 0 / diagonal / previous, top-k per row; diagonal = partial."""
        torch = self.torch
        _, H, n, d = q.shape
        nb = n // BLOCK
        pq = q.float().view(1, H, nb, BLOCK, d).mean(3)
        pk = k.float().view(1, H, nb, BLOCK, d).mean(3)
        s = pq @ pk.transpose(-1, -2)
        idx = torch.arange(nb)
        rows, cols = idx[:, None], idx[None, :]
        s = s.masked_fill(cols >= rows, float("-inf"))                   # diagonal handled apart
        s = s.masked_fill((cols == 0) & (rows > 0), float("inf"))       # sink block
        s = s.masked_fill((cols == rows - 1) & (rows > 1), float("inf"))  # previous block
        k_off = max(min(top_k, nb) - 1, 0)                                # off-diagonal blocks kept
        full_num = torch.clamp(idx, max=k_off).view(1, 1, nb).expand(1, H, nb).contiguous().to(torch.int32)
        if k_off > 0:
            top = s.topk(k_off, dim=-1).indices                           # [1, H, nb, k_off]
            valid = torch.arange(k_off).view(1, 1, 1, k_off) < full_num.unsqueeze(-1)
            top = torch.where(valid, top, torch.full_like(top, nb))       # invalid last after sort
            top = top.sort(dim=-1).values.clamp(max=nb - 1)
            full_idx = torch.zeros(1, H, nb, nb, dtype=torch.int32)
            full_idx[..., :k_off] = top.to(torch.int32)
        else:
            full_idx = torch.zeros(1, H, nb, nb, dtype=torch.int32)
        part_num = torch.ones(1, H, nb, dtype=torch.int32)
        part_idx = idx.view(1, 1, nb, 1).expand(1, H, nb, nb).contiguous().to(torch.int32)
        causal = lambda b, h, qi, ki: qi >= ki
        return self.BlockMask.from_kv_blocks(part_num, part_idx, full_num, full_idx,
                                             BLOCK_SIZE=BLOCK, mask_mod=causal)

    def flex_block_sparse(self, n, top_k, dtype, repeats):
        q, k, v = self.tensors(HEADS, n, HEADS, dtype, 1)
        return self.flex_run(q, k, v, None, repeats, prepare=lambda: self.block_sparse_mask(q, k, top_k))


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------

# Torch runs in worker processes: CPU FlexAttention can corrupt memory and abort the process
# (pytorch/pytorch#153145); a crashed case is reported as such and the worker restarted for the rest.

def worker_main(spec):
    import torch
    torch.set_num_threads(spec["threads"])
    T = Torch(torch)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    for i, (method, margs) in enumerate(spec["cases"]):
        note = ""
        try:
            res = getattr(T, method)(*margs, dtype, spec["repeats"])
            if isinstance(res, tuple):
                res, note = res
        except Exception as e:  # keep the other cases
            msg = str(e).splitlines()[0][:80] if str(e) else ""
            res = f"error: {type(e).__name__}: {msg}"
        print(json.dumps({"i": i, "ms": res, "note": note}), flush=True)
    return 0


def run_torch(jobs, threads, dtype, repeats):
    """Runs the jobs' torch cases in worker processes; fills row[column] (ms, or an error text)."""
    pending = list(range(len(jobs)))
    while pending:
        spec = {"threads": threads, "dtype": dtype, "repeats": repeats,
                "cases": [[jobs[j][2], jobs[j][3]] for j in pending]}
        for j in pending:
            print(f"compare_torch.py:     {jobs[j][2]}{tuple(jobs[j][3])}", file=sys.stderr)
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--_worker", json.dumps(spec)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        done = 0
        for line in p.stdout.splitlines():
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            row, col = jobs[pending[msg["i"]]][0], jobs[pending[msg["i"]]][1]
            row[col] = msg["ms"]
            if msg.get("note"):
                row["note"] = f"{row['note']} {msg['note']}"
            done = msg["i"] + 1
        if p.returncode == 0 and done == len(pending):
            return
        if done < len(pending):  # the worker died in case `done`: record it, go on after it
            row, col = jobs[pending[done]][0], jobs[pending[done]][1]
            why = f"signal {-p.returncode}" if p.returncode < 0 else f"exit {p.returncode}"
            last = (p.stderr.strip().splitlines() or [""])[-1][:60]
            row[col] = f"crashed ({why}: {last})"
            crashed = jobs[pending[done]][2]
            print(f"compare_torch.py:     {crashed} crashed ({why}); see "
                  "pytorch/pytorch#153145 for CPU FlexAttention", file=sys.stderr)
            pending = pending[done + 1:]
            if crashed.startswith("flex"):  # the rest would crash too, each after a compile
                for j in [j for j in pending if jobs[j][2].startswith("flex")]:
                    jobs[j][0][jobs[j][1]] = f"skipped (Flex crashed at {threads} threads)"
                pending = [j for j in pending if not jobs[j][2].startswith("flex")]
        else:
            return


def find_bench(path):
    cands = [path] if path else ["build/benchmarks/sparse_attn_bench",
                                 "build-test/benchmarks/sparse_attn_bench"]
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def fmt(x):
    if isinstance(x, str):
        return x
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def print_row(r):
    torch_ms = [x for x in (r["sdpa"], r["flex"]) if isinstance(x, float)]
    ratio = (min(torch_ms) / r["ours"]) if torch_ms and isinstance(r["ours"], float) else None
    print(f"| {r['case']} | {r['dtype']} | {r['threads']} | {fmt(r['ours'])} | {fmt(r['sdpa'])} | "
          f"{fmt(r['flex'])} | {fmt(ratio)} | {r['note']} |", flush=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "--_worker":
        return worker_main(json.loads(argv[1]))
    args = parse_args(argv)
    try:
        import torch
    except ImportError:
        print("compare_torch.py: PyTorch is not installed; skipping the comparison "
              "(install torch >= 2.5 for SDPA enable_gqa and FlexAttention on CPU).")
        return 0
    bench = find_bench(args.bench)
    if bench is None:
        print("compare_torch.py: sparse_attn_bench not found; build it "
              "(cmake --build build --target sparse_attn_bench) or pass --bench PATH", file=sys.stderr)
        return 2
    threads = [int(t) for t in args.threads.split(",") if t.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    cpus = os.cpu_count() or 1
    over = [t for t in threads if t > cpus]
    if over:
        print(f"compare_torch.py: note: {over} threads exceed this machine's {cpus} CPUs "
              "(oversubscribed; timings will not scale)", file=sys.stderr)
    n, dn, cr = args.n, args.decode_n, args.cr
    print(f"compare_torch.py: torch {torch.__version__}, {cpus} CPUs, prefill n={n}, decode n={dn}, "
          f"CR {cr:g}, threads {threads}", file=sys.stderr)

    rows = []  # dicts: case, dtype, threads, ours, sdpa, flex, note
    # Markdown table, printed as each (threads, dtype) batch completes.
    print("| case | K/V | threads | sparse_attn ms | torch SDPA ms | torch Flex ms | best torch / ours | note |")
    print("|---|---|---:|---:|---:|---:|---:|---|", flush=True)
    for t in threads:
        print(f"compare_torch.py: {t} thread(s): sparse_attn_bench ...", file=sys.stderr)
        ours = run_ours(bench, t, args, dtypes)
        for dt in dtypes:
            def our(name):
                r = ours.get(name)
                return (r["ms"], r["label"]) if r else (None, "")

            # (row, column, Torch method, args): torch runs in worker processes (see run_torch).
            jobs = []
            o, _ = our(f"prefill/dense/n:{n}/cr:1/{dt}")
            row = dict(case=f"prefill dense n={n}", dtype=dt, threads=t, ours=o, sdpa=None, flex=None,
                       note="SDPA is_causal")
            rows.append(row)
            jobs.append((row, "sdpa", "sdpa_prefill", [n]))
            if not args.no_flex:
                jobs.append((row, "flex", "flex_causal", [n]))
            if cr > 1:
                o, label = our(f"prefill/sliding_window/n:{n}/cr:{cr:g}/{dt}")
                m = re.search(r"W=(\d+)", label)
                w = int(m.group(1)) if m else window_for_cr(n, cr)
                row = dict(case=f"prefill sliding_window n={n} CR {cr:g}", dtype=dt, threads=t,
                           ours=o, sdpa=None, flex=None, note=f"W={w} S={SINKS}; SDPA: no sparse path")
                rows.append(row)
                if not args.no_flex:
                    jobs.append((row, "flex", "flex_sliding_window", [n, w]))
                o, label = our(f"prefill/block_sparse/n:{n}/cr:{cr:g}/{dt}")
                m = re.search(r"k=(\d+)", label)
                if m:
                    kk = int(m.group(1))
                    row = dict(case=f"prefill block_sparse n={n} CR {cr:g}", dtype=dt, threads=t,
                               ours=o, sdpa=None, flex=None,
                               note=f"k={kk} blocks of {BLOCK}; selection included")
                    rows.append(row)
                    if not args.no_flex:
                        jobs.append((row, "flex", "flex_block_sparse", [n, kk]))
            o, _ = our(f"decode/dense/n:{dn}/cr:1/{dt}")
            row = dict(case=f"decode dense n={dn}", dtype=dt, threads=t, ours=o, sdpa=None, flex=None,
                       note="SDPA")
            rows.append(row)
            jobs.append((row, "sdpa", "sdpa_decode", [dn]))
            print(f"compare_torch.py:   torch {dt} ...", file=sys.stderr)
            run_torch(jobs, t, dt, args.repeats)
            for r in rows:
                if r["threads"] == t and r["dtype"] == dt:
                    print_row(r)

    print()
    print("Ours: Q fp32 with K/V in the dtype shown; torch: Q, K and V all in that dtype. "
          "best torch / ours > 1: sparse_attn is faster.")

    os.makedirs(args.outdir, exist_ok=True)
    with open(os.path.join(args.outdir, "compare_torch.json"), "w") as f:
        json.dump({"torch": torch.__version__, "rows": rows}, f, indent=1)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("compare_torch.py: matplotlib missing; no thread_scaling.png", file=sys.stderr)
        return 0
    cases = sorted({(r["case"], r["dtype"]) for r in rows})
    cols = min(4, len(cases))
    nrows = math.ceil(len(cases) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.8 * nrows), squeeze=False)
    for ax, (case, dt) in zip(axes.flat, cases):
        rs = sorted((r for r in rows if r["case"] == case and r["dtype"] == dt), key=lambda r: r["threads"])
        for key, label in (("ours", "sparse_attn"), ("sdpa", "torch SDPA"), ("flex", "torch Flex")):
            pts = [(r["threads"], r[key]) for r in rs if isinstance(r[key], float)]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
        ts = [r["threads"] for r in rs]
        base = [r["ours"] for r in rs if isinstance(r["ours"], float)]
        if base and ts:
            ax.plot(ts, [base[0] * ts[0] / x for x in ts], "k:", lw=0.8, label="linear scaling")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{case}, {dt}", fontsize=9)
        ax.set_xlabel("threads")
        ax.set_ylabel("ms")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(cases):]:
        ax.axis("off")
    fig.tight_layout()
    path = os.path.join(args.outdir, "thread_scaling.png")
    fig.savefig(path, dpi=120)
    print(f"compare_torch.py: wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
