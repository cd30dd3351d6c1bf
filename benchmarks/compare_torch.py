#!/usr/bin/env python3
"""sparse_attn beside PyTorch CPU attention in one run: the same shapes, thread counts and dtypes,
with this machine's GEMM and FMA rooflines, a markdown report and a PASS/MISS list of targets.

    python3 benchmarks/compare_torch.py --bench build/benchmarks/sparse_attn_bench -o out/
        [--threads 1,16] [--n 16384] [--decode-n 131072] [--cr 10] [--dtypes fp32,bf16,bf16kv]
        [--cases dense,sliding_window,block_sparse,decode,roofline] [--no-flex] [--repeats 3]

What runs, per thread count T (ours at every T, then torch in worker processes; see Runtime):
  ours   one sparse_attn_bench --full --threads T run, filtered to the compared names (below),
         --benchmark_repetitions=R (median of the R repetitions), --benchmark_min_time=S, and the
         rooflines roofline/{fma_peak,bf16_dot_peak,stream_read,eigen_gemm/*} of the same binary
  torch  torch.set_num_threads(T); each case: 1 warm-up call (FlexAttention compiles in it), then
         up to R timed calls (median), fewer when they would pass --case-budget seconds

Cases (prefill H = 8 query and KV heads, d = 128, causal, n tokens; decode Hq = 32, Hkv = 8,
d = 128, one new token over an n-token cache):
  dense           ours prefill/dense/n:N/cr:1/DT              torch SDPA is_causal; Flex causal
  sliding_window  ours prefill/sliding_window/n:N/cr:CR/DT    torch Flex BlockMask, same W (parsed
                  from our label "W=..."), 4 sinks; SDPA has no sparse path: the table gives
                  SDPA dense / ours instead
  block_sparse    ours prefill/block_sparse/n:N/cr:CR/DT      torch Flex BlockMask built by the
                  same MInference-style selection done in torch (mean-pooled 64-blocks, forced
                  sink / previous / diagonal block, top-k per row with our k, parsed from "k=..."),
                  the selection timed in every call as ours is; and SDPA dense / ours
  decode          ours decode/dense/n:DN/cr:1/DT              torch SDPA, the faster of enable_gqa
                  (K/V [Hkv, n, d]) and the GQA group folded into the query length
                  (q as [Hkv, 4, d], exact for one decode token); both times are in the note
  roofline        torch.matmul 4096 x 4096 x 4096 in bf16 (oneDNN; AMX on Sapphire Rapids) and
                  fp32 (sgemm), GFLOP/s at each T; ours: the bench's roofline/* at each T; and the
                  dense rows' useful GFLOP/s (4 d H n(n+1)/2 FLOP) as a fraction of the torch GEMMs

dtypes (our benchmark name suffix DT; torch has one dtype for Q, K and V):
  fp32    ours: Q, K, V fp32                                               torch: fp32
  bf16    ours: Q, K, V and output bf16, bf16 products, fp32 accumulation  torch: bf16
  bf16kv  ours: Q fp32, K/V bf16, exact fp32 products                      torch: bf16 (torch has
          no mixed-dtype attention: bf16kv rows are compared with the same all-bf16 torch
          numbers as the bf16 rows; torch runs them once)

Table columns, per case, dtype and T: ours ms, SDPA ms, Flex ms (median ms per call),
SDPA / ours and Flex / ours (> 1: ours is faster), SDPA dense / ours (sparse rows: the dense
SDPA of the same dtype and T over our sparse time), ours 1->T (ours at the lowest thread count
over ours at T), note. Then the rooflines and the targets (issue "bf16 compute on server CPUs",
at n = 16384, CR 10, decode n = 131072; "16 threads" is the highest thread count of the run):
  dense bf16 SDPA / ours >= 1.2 at 16 threads, >= 1.0 at 1 thread; dense fp32 SDPA / ours >= 1.5
  at 16 threads, >= 1.0 at 1 thread; block_sparse and sliding_window bf16 SDPA dense / ours >= 8
  at 16 threads and ours 1->16 scaling >= 13; decode bf16 SDPA / ours >= 2.5 at 16 threads.

Outputs in --outdir: compare_torch.md (date, CPU model and flags, torch version, thread counts,
command line, table, rooflines, targets: ready to commit under docs/), compare_torch.json (every
measurement; rewritten after each step, so a run killed at a time limit keeps what it measured),
ours_t<T>.json (the bench's own JSON), thread_scaling.png (only when matplotlib is installed).
The markdown is also printed on stdout; progress goes to stderr.

Splitting a run (e.g. device calls limited to 10 minutes): run parts with different --threads or
--cases and -o folders, then, on any machine (no torch, no bench needed):
    python3 benchmarks/compare_torch.py --merge part1/compare_torch.json part2/compare_torch.json -o all/
Later files override earlier ones for the same measurement.
Without torch: --dry-run runs (or, with --ours-json FILE, reads) our bench only and renders the
report with the torch columns empty; a plain run without torch prints a message and exits 0.

Runtime on a 16-core Sapphire Rapids at the defaults (estimate from earlier runs): ours ~70 s at
1 thread (dense fp32 and bf16kv ~6 s a call, 3 repetitions) and ~10 s at 16; torch SDPA and GEMMs
~45 s at 1 thread (SDPA fp32 ~5 s a call) and ~10 s at 16; FlexAttention ~3-5 min at 1 thread
(6 compiles, ~15-40 s each, and dense fp32 ~9 s a call) and ~30 s at 16 threads, where with torch
2.11 compiled CPU FlexAttention crashed at every thread count above 1 (pytorch/pytorch#153145: the
crashed case reads "crashed", the other Flex cases of that T "skipped"). About 6-8 minutes in all.
Order: ours at every T, then torch SDPA/GEMM at every T, then Flex at every T, so that under
--time-limit (default 540 s, below a 10-minute device call) what gets cut is Flex, which no target
needs; a killed case reads "killed at the time limit", later ones "not run (time limit)". Cheaper:
--flex-threads 1 (skips the known crash, ~30 s), --no-flex (~4 min), or two calls
(--threads 1 / --threads 16, or --cases) and --merge.
FlexAttention's compile time (in the warm-up call; the note gives the first call's time) and
BlockMask creation for causal and sliding window are not timed (a model builds those once per
shape and reuses them in every layer).
"""
import argparse
import datetime
import importlib.util
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HEADS, DIM = 8, 128          # prefill: Hq = Hkv = 8
DEC_HQ, DEC_HKV = 32, 8      # decode
SINKS, BLOCK = 4, 64
ALL_CASES = ("dense", "sliding_window", "block_sparse", "decode", "roofline")
ALL_DTYPES = ("fp32", "bf16", "bf16kv")
TORCH_DTYPE = {"fp32": "fp32", "bf16": "bf16", "bf16kv": "bf16"}
DTYPE_TEXT = {
    "fp32": "Q, K, V fp32 (torch: fp32)",
    "bf16": "Q, K, V bf16, bf16 products with fp32 accumulation (torch: bf16)",
    "bf16kv": "Q fp32, K/V bf16, exact fp32 products (torch: bf16, no mixed mode)",
}
OUR_ROOFLINES = (("roofline/fma_peak", "GFLOPs", "ours fp32 FMA peak (roofline/fma_peak)", "GFLOP/s"),
                 ("roofline/bf16_dot_peak", "GFLOPs",
                  "ours bf16 dot peak (roofline/bf16_dot_peak, vdpbf16ps)", "GFLOP/s"),
                 ("roofline/stream_read", "GBps", "ours stream read (roofline/stream_read)", "GB/s"))
SCHEMA = 2


def log(msg):
    print(f"compare_torch.py: {msg}", file=sys.stderr, flush=True)


def csv_list(s, cast=str):
    return [cast(x.strip()) for x in s.split(",") if x.strip()]


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", default=None,
                    help="path to sparse_attn_bench (default: build/benchmarks/sparse_attn_bench)")
    ap.add_argument("--threads", default="1,16", help="comma-separated thread counts (default 1,16)")
    ap.add_argument("--n", type=int, default=16384,
                    help="prefill tokens, a power of two 1024..65536 (default 16384)")
    ap.add_argument("--decode-n", type=int, default=131072,
                    help="decode cache tokens, a power of two 4096..131072 (default 131072)")
    ap.add_argument("--cr", type=float, default=10, help="target CR of the sparse cases (default 10)")
    ap.add_argument("--dtypes", default="fp32,bf16,bf16kv",
                    help="our dtypes: fp32, bf16, bf16kv (default all three)")
    ap.add_argument("--cases", default=",".join(ALL_CASES),
                    help="comma-separated subset of: " + ", ".join(ALL_CASES) + " (default all)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed torch calls per case and our --benchmark_repetitions (median; default 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed torch calls per case (default 1)")
    ap.add_argument("--case-budget", type=float, default=20.0,
                    help="seconds of timed torch calls per case: fewer than --repeats (at least 1) "
                         "when the next would pass it (default 20)")
    ap.add_argument("--min-time", type=float, default=0.05,
                    help="our --benchmark_min_time per repetition, seconds (default 0.05)")
    ap.add_argument("--gemm-n", type=int, default=4096, help="torch GEMM roofline size (default 4096)")
    ap.add_argument("--time-limit", type=float, default=540,
                    help="seconds for the whole run (default 540, under a 10-minute device call; 0: "
                         "none): past it nothing new starts, a running case is killed, and the "
                         "report is written with what was measured")
    ap.add_argument("--no-flex", action="store_true",
                    help="skip FlexAttention (it compiles with the C++ toolchain)")
    ap.add_argument("--flex-threads", default=None,
                    help="thread counts at which to run FlexAttention (default: all of --threads)")
    ap.add_argument("--bench-arg", action="append", default=[],
                    help="extra argument for sparse_attn_bench (repeatable)")
    ap.add_argument("--quiet-bench", action="store_true", help="pass --no-progress to our bench")
    ap.add_argument("-o", "--outdir", default="bench_compare",
                    help="output folder (default bench_compare)")
    ap.add_argument("--no-plot", action="store_true", help="no thread_scaling.png")
    ap.add_argument("--dry-run", action="store_true",
                    help="no torch: run (or read, --ours-json) our bench only and render the report")
    ap.add_argument("--ours-json", action="append", default=[], metavar="FILE",
                    help="use this sparse_attn_bench JSON (--benchmark_format=json or "
                         "--benchmark_out) instead of running the bench; its thread count comes "
                         "from context.sparse_attn_threads (repeatable)")
    ap.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                    help="render one report from earlier runs' compare_torch.json files; runs nothing")
    args = ap.parse_args(argv)
    args.thread_list = csv_list(args.threads, int)
    args.dtype_list = csv_list(args.dtypes)
    args.case_list = csv_list(args.cases)
    for what, got, allowed in (("--dtypes", args.dtype_list, ALL_DTYPES),
                               ("--cases", args.case_list, ALL_CASES)):
        bad = [x for x in got if x not in allowed]
        if bad:
            ap.error(f"{what}: unknown {bad}; choose from {', '.join(allowed)}")
    if not args.thread_list or min(args.thread_list) < 1:
        ap.error("--threads: give thread counts >= 1")
    args.flex_thread_list = (csv_list(args.flex_threads, int) if args.flex_threads is not None
                             else list(args.thread_list))
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    return args


# ------------------------------------------------------------------------------------------------
# Names and keys
# ------------------------------------------------------------------------------------------------

def fmt_cr(cr):
    return f"{cr:g}"


def our_name(case, n, dn, cr, dt):
    if case == "dense":
        return f"prefill/dense/n:{n}/cr:1/{dt}"
    if case in ("sliding_window", "block_sparse"):
        return f"prefill/{case}/n:{n}/cr:{fmt_cr(cr)}/{dt}"
    if case == "decode":
        return f"decode/dense/n:{dn}/cr:1/{dt}"
    raise ValueError(case)


def our_names(cases, n, dn, cr, dtypes):
    return [our_name(c, n, dn, cr, dt) for c in cases if c != "roofline" for dt in dtypes]


ROOFLINE_RE = "roofline/(fma_peak|bf16_dot_peak|stream_read|eigen_gemm/.*)"


def our_filter(names, rooflines):
    alts = [re.escape(x) for x in names] + ([ROOFLINE_RE] if rooflines else [])
    return "^(" + "|".join(alts) + ")$"


def torch_key(job, n, tdt, cr=None):
    return f"{job}/n:{n}" + (f"/cr:{fmt_cr(cr)}" if cr is not None else "") + f"/{tdt}"


# ------------------------------------------------------------------------------------------------
# Ours: one sparse_attn_bench run per thread count
# ------------------------------------------------------------------------------------------------

UNIT = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}
COUNTERS = ("GFLOPs", "GBps", "achieved_cr", "select_ms", "speedup_vs_dense")


def parse_bench_json(data):
    """Google Benchmark JSON -> (threads or None, context, {name: record}). Repetitions are grouped
    by run_name and reduced to their median (aggregate rows are ignored); an errored benchmark gives
    {"error": message}."""
    ctx = data.get("context", {})
    try:
        threads = int(ctx.get("sparse_attn_threads"))
    except (TypeError, ValueError):
        threads = None
    runs, errors, labels = {}, {}, {}
    for b in data.get("benchmarks", []):
        if b.get("run_type") == "aggregate":
            continue
        name = b.get("run_name") or b.get("name")
        if b.get("error_occurred"):
            errors[name] = b.get("error_message", "error")
            continue
        ms = b["real_time"] * UNIT.get(b.get("time_unit", "ns"), 1e-9) * 1e3
        rec = runs.setdefault(name, {"ms": [], "counters": {}})
        rec["ms"].append(ms)
        for c in COUNTERS:
            if c in b:
                rec["counters"].setdefault(c, []).append(b[c])
        labels[name] = b.get("label", "")
    out = {}
    for name, rec in runs.items():
        out[name] = {"ms": statistics.median(rec["ms"]), "runs": len(rec["ms"]),
                     "label": labels.get(name, ""),
                     "counters": {c: statistics.median(v) for c, v in rec["counters"].items()}}
    for name, msg in errors.items():
        out.setdefault(name, {"error": msg})
    return threads, ctx, out


def run_bench_list(bench, filt, extra):
    p = subprocess.run([bench, "--full", "--no-progress", f"--benchmark_filter={filt}",
                        "--benchmark_list_tests=true"] + extra,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"sparse_attn_bench --benchmark_list_tests exited {p.returncode}: "
                           f"{p.stderr.strip()[-400:]}")
    return [x.strip() for x in p.stdout.splitlines() if x.strip()]


def remaining(deadline):
    return None if deadline is None else deadline - time.time()


def run_ours(bench, threads, names, rooflines, args, deadline):
    filt = our_filter(names, rooflines)
    try:
        listed = set(run_bench_list(bench, filt, args.bench_arg))
        missing = [x for x in names if x not in listed]
        if missing:
            log(f"WARNING: our bench has no benchmark named {missing} (check the dtype suffixes "
                f"fp32/bf16/bf16kv and n/CR); those rows will read 'missing'")
    except RuntimeError as e:
        log(f"WARNING: {e}")
    os.makedirs(args.outdir, exist_ok=True)
    out_path = os.path.join(args.outdir, f"ours_t{threads}.json")
    cmd = [bench, "--full", "--threads", str(threads), f"--benchmark_filter={filt}",
           f"--benchmark_min_time={args.min_time:g}", f"--benchmark_repetitions={args.repeats}",
           f"--benchmark_out={out_path}", "--benchmark_out_format=json"] + list(args.bench_arg)
    if args.quiet_bench:
        cmd.append("--no-progress")
    log(f"{threads} thread(s): {' '.join(shlex.quote(c) for c in cmd)}")
    t0 = time.time()
    left = remaining(deadline)
    if left is not None and left < 5:
        log(f"{threads} thread(s): time limit reached; our bench not run")
        return None, {}
    try:  # its console table on stderr: progress
        p = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr, timeout=left)
    except subprocess.TimeoutExpired:
        log(f"{threads} thread(s): our bench killed at the time limit; its rows read 'missing'")
        return None, {}
    if p.returncode != 0:
        raise RuntimeError(f"sparse_attn_bench exited {p.returncode} at {threads} thread(s)")
    with open(out_path) as f:
        t, ctx, res = parse_bench_json(json.load(f))
    log(f"{threads} thread(s): ours done in {time.time() - t0:.0f} s")
    return ctx, res


# ------------------------------------------------------------------------------------------------
# Torch (imported only in the worker processes)
# ------------------------------------------------------------------------------------------------

def window_for_cr(n, cr, sinks=SINKS):
    """Fallback when our label lacks W: the W whose sliding-window pair count (4 sinks, causal) is
    closest to dense / cr."""
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


def blocks_for_cr(n, cr):
    """Fallback when our label lacks k: blocks per query-block row (sink, previous and diagonal at
    least) whose block-causal pair count is closest to dense / cr."""
    nb = n // BLOCK
    target = n * (n + 1) / 2 / cr

    def pairs(k):
        return sum((min(qb + 1, k) - 1) * BLOCK * BLOCK for qb in range(nb)) + nb * BLOCK * (BLOCK + 1) / 2
    best = min(range(1, nb + 1), key=lambda k: abs(pairs(k) - target))
    return max(best, min(3, nb))


def causal_mask(b, h, q_idx, kv_idx):
    """FlexAttention mask_mod of causal attention (one function object: no recompiles)."""
    return q_idx >= kv_idx


def timed(fn, repeats, warmup, budget_s):
    """Median ms of up to `repeats` calls after `warmup` calls; stops early (at least one call) when
    the next call would take the timed total past budget_s. Returns (ms, calls, first call ms)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    first = (time.perf_counter() - t0) * 1e3 if warmup else None
    ts = []
    while len(ts) < repeats:
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
        if (sum(ts) + ts[-1]) / 1e3 > budget_s:
            break
    return statistics.median(ts), len(ts), first


class Torch:
    def __init__(self, torch, repeats, warmup, budget):
        self.torch = torch
        import torch.nn.functional as F
        self.F = F
        self.repeats, self.warmup, self.budget = repeats, warmup, budget
        self._flex = None
        self.flex_error = None

    def flex(self):
        if self._flex is None and self.flex_error is None:
            try:
                from torch.nn.attention.flex_attention import (BlockMask, create_block_mask,
                                                               flex_attention)
                self.BlockMask, self.create_block_mask = BlockMask, create_block_mask
                # One worker compiles up to 6 variants (3 masks x 2 dtypes) of the same function:
                # stay under Dynamo's recompile limit (8 by default), past which it runs eagerly.
                try:
                    import torch._dynamo
                    cfg = torch._dynamo.config
                    for name in ("recompile_limit", "cache_size_limit"):
                        if hasattr(cfg, name):
                            setattr(cfg, name, max(getattr(cfg, name), 64))
                except Exception as e:  # keep Flex; only the limit stays as it was
                    print(f"compare_torch.py worker: Dynamo recompile limit unchanged: {e}",
                          file=sys.stderr)
                self._flex = self.torch.compile(flex_attention, dynamic=False)
            except Exception as e:  # torch < 2.5, or no compile support
                self.flex_error = f"{type(e).__name__}: {e}"
        if self._flex is None:
            raise RuntimeError(self.flex_error)
        return self._flex

    def time(self, fn):
        with self.torch.no_grad():
            return timed(fn, self.repeats, self.warmup, self.budget)

    def dtype(self, tdt):
        return {"fp32": self.torch.float32, "bf16": self.torch.bfloat16}[tdt]

    def tensors(self, h, n, kv_heads, dtype, seed):
        g = self.torch.Generator().manual_seed(seed)
        mk = lambda heads, toks: self.torch.rand(1, heads, toks, DIM, generator=g) * 2 - 1
        q, k, v = mk(h, n), mk(kv_heads, n), mk(kv_heads, n)
        return q.to(dtype), k.to(dtype), v.to(dtype)

    # -- cases: each returns (ms, calls, first_ms, note)
    def matmul(self, tdt, n):
        g = self.torch.Generator().manual_seed(3)
        a = (self.torch.rand(n, n, generator=g) * 2 - 1).to(self.dtype(tdt))
        b = (self.torch.rand(n, n, generator=g) * 2 - 1).to(self.dtype(tdt))
        ms, calls, first = self.time(lambda: self.torch.matmul(a, b))
        return ms, calls, first, f"torch.matmul {n}^3 {tdt}"

    def sdpa_prefill(self, tdt, n):
        q, k, v = self.tensors(HEADS, n, HEADS, self.dtype(tdt), 1)
        ms, calls, first = self.time(lambda: self.F.scaled_dot_product_attention(q, k, v, is_causal=True))
        return ms, calls, first, "SDPA is_causal"

    def sdpa_decode(self, tdt, n):
        torch, F = self.torch, self.F
        dtype = self.dtype(tdt)
        g = torch.Generator().manual_seed(2)
        q = (torch.rand(1, DEC_HQ, 1, DIM, generator=g) * 2 - 1).to(dtype)
        k = (torch.rand(1, DEC_HKV, n, DIM, generator=g) * 2 - 1).to(dtype)
        v = (torch.rand(1, DEC_HKV, n, DIM, generator=g) * 2 - 1).to(dtype)
        G = DEC_HQ // DEC_HKV
        results = {}
        with torch.no_grad():
            try:
                F.scaled_dot_product_attention(q, k[:, :, :16], v[:, :, :16], enable_gqa=True)
                gqa = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                name = "enable_gqa"
            except TypeError:  # torch < 2.5: expand K/V to every query head (timed: it is the cost)
                gqa = lambda: F.scaled_dot_product_attention(
                    q, k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1))
                name = "repeat_interleave"
        results[name] = self.time(gqa)
        # One decode token: query head h = j*G + g reads KV head j, so the G query heads of a group
        # are G queries of one head with no mask (the usual GQA decode trick).
        qf = q.view(1, DEC_HKV, G, DIM)
        results["folded"] = self.time(lambda: F.scaled_dot_product_attention(qf, k, v))
        best = min(results, key=lambda x: results[x][0])
        ms, calls, first = results[best]
        note = f"SDPA {best} (" + ", ".join(f"{x} {r[0]:.2f} ms" for x, r in results.items()) + ")"
        return ms, calls, first, note

    def flex_run(self, q, k, v, block_mask=None, prepare=None):
        flex = self.flex()
        if prepare is None:
            return self.time(lambda: flex(q, k, v, block_mask=block_mask))
        return self.time(lambda: flex(q, k, v, block_mask=prepare()))

    def flex_causal(self, tdt, n):
        self.flex()
        q, k, v = self.tensors(HEADS, n, HEADS, self.dtype(tdt), 1)
        bm = self.create_block_mask(causal_mask, None, None, n, n, device="cpu")
        return (*self.flex_run(q, k, v, bm), "Flex causal BlockMask")

    def flex_sliding_window(self, tdt, n, w):
        self.flex()
        q, k, v = self.tensors(HEADS, n, HEADS, self.dtype(tdt), 1)

        def sw(b, h, qi, ki):
            return (qi >= ki) & ((ki < SINKS) | (qi - ki < w))
        bm = self.create_block_mask(sw, None, None, n, n, device="cpu")
        return (*self.flex_run(q, k, v, bm), f"Flex W={w} S={SINKS}")

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
        full_idx = torch.zeros(1, H, nb, nb, dtype=torch.int32)
        if k_off > 0:
            top = s.topk(k_off, dim=-1).indices                           # [1, H, nb, k_off]
            valid = torch.arange(k_off).view(1, 1, 1, k_off) < full_num.unsqueeze(-1)
            top = torch.where(valid, top, torch.full_like(top, nb))       # invalid last after sort
            top = top.sort(dim=-1).values.clamp(max=nb - 1)
            full_idx[..., :k_off] = top.to(torch.int32)
        part_num = torch.ones(1, H, nb, dtype=torch.int32)
        part_idx = idx.view(1, 1, nb, 1).expand(1, H, nb, nb).contiguous().to(torch.int32)
        return self.BlockMask.from_kv_blocks(part_num, part_idx, full_num, full_idx,
                                             BLOCK_SIZE=BLOCK, mask_mod=causal_mask)

    def flex_block_sparse(self, tdt, n, top_k):
        self.flex()
        q, k, v = self.tensors(HEADS, n, HEADS, self.dtype(tdt), 1)
        return (*self.flex_run(q, k, v, prepare=lambda: self.block_sparse_mask(q, k, top_k)),
                f"Flex k={top_k} blocks of {BLOCK}, selection timed")


def worker_main(spec):
    """Runs spec["cases"] ([method, dtype, args]) in this process; one JSON line per event."""
    import torch
    torch.set_num_threads(spec["threads"])
    info = {"torch": torch.__version__, "num_threads": torch.get_num_threads()}
    try:
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except Exception:  # older torch
        pass
    try:
        info["mkldnn"] = bool(torch.backends.mkldnn.is_available())
    except Exception:
        pass
    print(json.dumps({"info": info}), flush=True)
    T = Torch(torch, spec["repeats"], spec["warmup"], spec["budget"])
    for i, (method, tdt, margs) in enumerate(spec["cases"]):
        print(json.dumps({"start": i}), flush=True)
        try:
            ms, calls, first, note = getattr(T, method)(tdt, *margs)
            msg = {"i": i, "ms": ms, "calls": calls, "first_ms": first, "note": note}
        except Exception as e:  # keep the other cases
            text = str(e).splitlines()[0][:100] if str(e) else ""
            msg = {"i": i, "ms": f"error: {type(e).__name__}: {text}", "note": ""}
        print(json.dumps(msg), flush=True)
    return 0


def run_torch(jobs, threads, args, store, save, deadline):
    """Runs the jobs (dicts: key, method, tdt, args, flex) in worker processes at `threads`.
    Records store[key] = {ms | error text, calls, first_ms, note, args}. CPU FlexAttention can
    corrupt memory and abort the process (pytorch/pytorch#153145): the crashed case is recorded, the
    worker restarted after it, and the remaining Flex cases of this thread count skipped."""
    info = {}
    pending = list(jobs)
    while pending:
        left = remaining(deadline)
        if left is not None and left < 5:
            for j in pending:
                store[j["key"]] = {"ms": "not run (time limit)", "note": "", "args": j["args"]}
            log(f"  torch {threads}T: time limit reached; {len(pending)} case(s) not run")
            save()
            return info
        spec = {"threads": threads, "repeats": args.repeats, "warmup": args.warmup,
                "budget": args.case_budget,
                "cases": [[j["method"], j["tdt"], j["args"]] for j in pending]}
        with tempfile.TemporaryFile(mode="w+") as err:
            p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--_worker", json.dumps(spec)],
                                 stdout=subprocess.PIPE, stderr=err, text=True)
            timer, killed = None, []
            if left is not None:
                timer = threading.Timer(left, lambda: (killed.append(1), p.kill()))
                timer.start()
            done, t_case = 0, time.time()
            for line in p.stdout:
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if "info" in msg:
                    info = msg["info"]
                elif "start" in msg:
                    t_case = time.time()
                    j = pending[msg["start"]]
                    log(f"  torch {threads}T {j['key']} {j['args']} ...")
                elif "i" in msg:
                    j = pending[msg["i"]]
                    store[j["key"]] = {"ms": msg["ms"], "calls": msg.get("calls"),
                                       "first_ms": msg.get("first_ms"), "note": msg.get("note", ""),
                                       "args": j["args"]}
                    shown = (f"{msg['ms']:.2f} ms ({msg.get('calls')} calls, " if isinstance(msg["ms"], float)
                             else f"{msg['ms']} (")
                    log(f"  torch {threads}T {j['key']}: {shown}{time.time() - t_case:.1f} s with warm-up)")
                    done = msg["i"] + 1
                    save()
            rc = p.wait()
            if timer is not None:
                timer.cancel()
            err.seek(0)
            err_tail = [x for x in err.read().strip().splitlines() if x.strip()]
        if done == len(pending):
            if rc != 0:
                log(f"  torch worker exited {rc} after its last case")
            return info
        j = pending[done]
        if killed:
            store[j["key"]] = {"ms": "killed at the time limit", "note": "", "args": j["args"]}
            for r in pending[done + 1:]:
                store[r["key"]] = {"ms": "not run (time limit)", "note": "", "args": r["args"]}
            log(f"  torch {threads}T {j['key']} killed at the time limit")
            save()
            return info
        # The worker died in case `done`: record it, go on after it.
        why = f"signal {-rc}" if rc < 0 else f"exit {rc}"
        last = (err_tail or [""])[-1][:80]
        store[j["key"]] = {"ms": f"crashed ({why}{': ' + last if last else ''})", "note": "",
                           "args": j["args"]}
        log(f"  torch {threads}T {j['key']} crashed ({why}); last stderr line: {last}")
        if j["flex"]:
            log("  (see pytorch/pytorch#153145 for CPU FlexAttention); skipping the other Flex "
                f"cases at {threads} thread(s)")
        pending = pending[done + 1:]
        if j["flex"]:  # the rest would crash too, each after a compile
            for r in [r for r in pending if r["flex"]]:
                store[r["key"]] = {"ms": f"skipped (Flex crashed at {threads} threads)", "note": "",
                                   "args": r["args"]}
            pending = [r for r in pending if not r["flex"]]
        save()
    return info


def torch_jobs(args, threads, ours, flex):
    """The torch cases at `threads`: rooflines and SDPA (flex False), or the FlexAttention ones."""
    n, dn, cr = args.n, args.decode_n, args.cr
    tdts = []
    for dt in args.dtype_list:
        if TORCH_DTYPE[dt] not in tdts:
            tdts.append(TORCH_DTYPE[dt])
    cases = args.case_list
    jobs = []

    def add(method, tdt, margs, key, flex=False):
        if key not in [j["key"] for j in jobs]:
            jobs.append({"method": method, "tdt": tdt, "args": margs, "key": key, "flex": flex})
    if "roofline" in cases:
        for tdt in ("bf16", "fp32"):
            add("matmul", tdt, [args.gemm_n], torch_key("matmul", args.gemm_n, tdt))
    prefill = [c for c in cases if c in ("dense", "sliding_window", "block_sparse")]
    for tdt in tdts:
        if prefill:  # the sparse rows' SDPA dense / ours needs it too
            add("sdpa_prefill", tdt, [n], torch_key("sdpa_prefill", n, tdt))
        if "decode" in cases:
            add("sdpa_decode", tdt, [dn], torch_key("sdpa_decode", dn, tdt))
    if not flex:
        return jobs
    jobs = []
    if args.no_flex or threads not in args.flex_thread_list:
        return jobs
    for tdt in sorted(tdts, key=lambda x: x != "bf16"):  # bf16 first
        if "dense" in cases:
            add("flex_causal", tdt, [n], torch_key("flex_causal", n, tdt), True)
        if "sliding_window" in cases:
            w = label_int(ours, [our_name("sliding_window", n, dn, cr, dt) for dt in args.dtype_list], "W")
            add("flex_sliding_window", tdt, [n, w or window_for_cr(n, cr)],
                torch_key("flex_sliding_window", n, tdt, cr), True)
        if "block_sparse" in cases:
            k = label_int(ours, [our_name("block_sparse", n, dn, cr, dt) for dt in args.dtype_list], "k")
            add("flex_block_sparse", tdt, [n, k or blocks_for_cr(n, cr)],
                torch_key("flex_block_sparse", n, tdt, cr), True)
    return jobs


def label_int(ours, names, key):
    """The integer after `key=` in the label of the first of `names` that ran at any thread count."""
    for res in ours.values():
        for name in names:
            m = re.search(rf"\b{key}=(\d+)", (res.get(name) or {}).get("label", ""))
            if m:
                return int(m.group(1))
    return None


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------

def num(x):
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def fmt_ms(x, missing="n/a"):
    if isinstance(x, str):
        return x if len(x) <= 60 else x[:57] + "..."
    if num(x) is None:
        return missing
    return f"{x:.3f}" if x < 10 else f"{x:.1f}" if x >= 1000 else f"{x:.2f}"


def fmt_ratio(x):
    return "" if num(x) is None else f"{x:.2f}"


def ratio(a, b):
    return a / b if num(a) is not None and num(b) is not None and b > 0 else None


class Report:
    """Everything measured (possibly merged from several runs) and the tables derived from it."""

    def __init__(self, doc):
        self.doc = doc
        p = doc["params"]
        self.n, self.dn, self.cr = p["n"], p["decode_n"], p["cr"]
        self.gemm_n = p.get("gemm_n", 4096)
        self.threads = sorted({int(t) for t in doc["ours"]} | {int(t) for t in doc["torch"]}
                              | set(p.get("threads", [])))
        self.dtypes = [d for d in ALL_DTYPES if d in p.get("dtypes", ALL_DTYPES)]
        self.cases = [c for c in ALL_CASES if c in p.get("cases", ALL_CASES)]
        self.lo = 1 if 1 in self.threads else (min(self.threads) if self.threads else 1)
        self.hi = 16 if 16 in self.threads else (max(self.threads) if self.threads else 16)

    def ours(self, t, name):
        r = self.doc["ours"].get(str(t), {}).get(name)
        if r is None:
            return None, "missing" if str(t) in self.doc["ours"] else None, {}
        if "error" in r:
            return None, f"error: {r['error'][:60]}", r
        return r["ms"], None, r

    def torch(self, t, key):
        r = self.doc["torch"].get(str(t), {}).get(key)
        if r is None:
            return None, {}
        return r["ms"], r

    def row(self, case, dt, t):
        n, dn, cr = self.n, self.dn, self.cr
        tdt = TORCH_DTYPE[dt]
        name = our_name(case, n, dn, cr, dt)
        o_ms, o_why, o_rec = self.ours(t, name)
        r = {"case": case, "dtype": dt, "threads": t, "name": name, "ours": o_ms,
             "ours_text": o_why, "sdpa": None, "flex": None, "sdpa_dense": None, "notes": []}
        if o_rec.get("label"):
            r["notes"].append(o_rec["label"])
        dense_sdpa, _ = self.torch(t, torch_key("sdpa_prefill", n, tdt))
        if case == "dense":
            r["sdpa"], rec = self.torch(t, torch_key("sdpa_prefill", n, tdt))
            r["flex"], _ = self.torch(t, torch_key("flex_causal", n, tdt))
        elif case == "sliding_window":
            r["flex"], rec = self.torch(t, torch_key("flex_sliding_window", n, tdt, cr))
            r["sdpa_dense"] = dense_sdpa
        elif case == "block_sparse":
            r["flex"], rec = self.torch(t, torch_key("flex_block_sparse", n, tdt, cr))
            r["sdpa_dense"] = dense_sdpa
        else:
            r["sdpa"], rec = self.torch(t, torch_key("sdpa_decode", dn, tdt))
            if rec.get("note"):
                r["notes"].append(rec["note"])
        if case != "decode":
            fkey = {"dense": torch_key("flex_causal", n, tdt),
                    "sliding_window": torch_key("flex_sliding_window", n, tdt, cr),
                    "block_sparse": torch_key("flex_block_sparse", n, tdt, cr)}[case]
            _, frec = self.torch(t, fkey)
            if num(frec.get("first_ms")) is not None and num(r["flex"]) is not None:
                r["notes"].append(f"Flex first call {frec['first_ms'] / 1e3:.1f} s (compile)")
        if o_rec.get("counters", {}).get("achieved_cr") and case in ("sliding_window", "block_sparse"):
            r["notes"].append(f"achieved CR {o_rec['counters']['achieved_cr']:.2f}")
        if dt == "bf16kv" and (num(r["sdpa"]) or num(r["flex"]) or num(r["sdpa_dense"])):
            r["notes"].append("torch: all-bf16")
        r["sdpa_ratio"] = ratio(r["sdpa"], o_ms)
        r["flex_ratio"] = ratio(r["flex"], o_ms)
        r["sdpa_dense_ratio"] = ratio(r["sdpa_dense"], o_ms)
        base, _, _ = self.ours(self.lo, name)
        r["scaling"] = ratio(base, o_ms) if t != self.lo else None
        return r

    def rows(self):
        return [self.row(c, dt, t) for c in self.cases if c != "roofline"
                for dt in self.dtypes for t in self.threads]

    def case_title(self, case):
        return {"dense": f"prefill dense causal n={self.n}",
                "sliding_window": f"prefill sliding_window n={self.n} CR {fmt_cr(self.cr)}",
                "block_sparse": f"prefill block_sparse n={self.n} CR {fmt_cr(self.cr)}",
                "decode": f"decode dense n={self.dn} Hq={DEC_HQ}/Hkv={DEC_HKV}"}[case]

    def table(self):
        lines = [f"| case | dtype | threads | ours ms | SDPA ms | Flex ms | SDPA / ours | Flex / ours "
                 f"| SDPA dense / ours | ours {self.lo}->T | note |",
                 "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in self.rows():
            sdpa = "no sparse path" if r["case"] in ("sliding_window", "block_sparse") else fmt_ms(r["sdpa"])
            flex = "n/a" if r["case"] == "decode" else fmt_ms(r["flex"], "not run")
            lines.append(
                f"| {self.case_title(r['case'])} | {r['dtype']} | {r['threads']} | "
                f"{r['ours_text'] or fmt_ms(r['ours'])} | {sdpa} | {flex} | {fmt_ratio(r['sdpa_ratio'])} | "
                f"{fmt_ratio(r['flex_ratio'])} | {fmt_ratio(r['sdpa_dense_ratio'])} | "
                f"{fmt_ratio(r['scaling'])} | {'; '.join(r['notes'])} |")
        return lines

    def roofline_table(self):
        ts = self.threads
        lines = ["| roofline | unit | " + " | ".join(f"{t} thread{'s' if t > 1 else ''}" for t in ts) + " |",
                 "|---|---|" + "---:|" * len(ts)]
        gemm_flop = 2.0 * self.gemm_n ** 3
        gemm = {}
        for tdt, what in (("bf16", "bf16 GEMM (oneDNN; AMX where present)"), ("fp32", "fp32 sgemm")):
            cells = []
            for t in ts:
                ms, _ = self.torch(t, torch_key("matmul", self.gemm_n, tdt))
                g = gemm_flop / (ms * 1e-3) / 1e9 if num(ms) else None
                gemm[(tdt, t)] = g
                cells.append(f"{g:.0f}" if g else (ms if isinstance(ms, str) else ""))
            lines.append(f"| torch.matmul {self.gemm_n}^3 {what} | GFLOP/s | " + " | ".join(cells) + " |")
        names = set()
        for res in self.doc["ours"].values():
            names |= {x for x in res if x.startswith("roofline/")}
        rl = [(x, c, title, unit) for x, c, title, unit in OUR_ROOFLINES]
        rl += [(x, "GFLOPs", f"ours Eigen sgemm ({x})", "GFLOP/s") for x in sorted(names)
               if x.startswith("roofline/eigen_gemm/")]
        for name, counter, title, unit in rl:
            cells = []
            for t in ts:
                rec = self.doc["ours"].get(str(t), {}).get(name) or {}
                v = rec.get("counters", {}).get(counter)
                cells.append(f"{v:.1f}" if num(v) is not None else ("error" if "error" in rec else ""))
            if any(cells):
                lines.append(f"| {title} | {unit} | " + " | ".join(cells) + " |")
        # Dense attention as a fraction of the torch GEMM of its dtype.
        attn_flop = 4.0 * DIM * HEADS * self.n * (self.n + 1) / 2
        if "dense" in self.cases:
            for dt in self.dtypes:
                tdt = TORCH_DTYPE[dt]
                for who in ("ours", "SDPA"):
                    cells = []
                    for t in ts:
                        if who == "ours":
                            ms, _, _ = self.ours(t, our_name("dense", self.n, self.dn, self.cr, dt))
                        else:
                            ms, _ = self.torch(t, torch_key("sdpa_prefill", self.n, tdt))
                        g = attn_flop / (ms * 1e-3) / 1e9 if num(ms) else None
                        frac = ratio(g, gemm.get((tdt, t)))
                        cells.append("" if g is None else f"{g:.0f}" + (f" ({frac:.2f})" if frac else ""))
                    if any(cells) and not (who == "SDPA" and dt == "bf16kv"):
                        lines.append(f"| {who} dense causal {dt if who == 'ours' else tdt} n={self.n}, "
                                     f"useful FLOP (fraction of torch {tdt} GEMM) | GFLOP/s | "
                                     + " | ".join(cells) + " |")
        return lines

    def targets(self):
        lo, hi, n, dn, cr = self.lo, self.hi, self.n, self.dn, self.cr
        rows = {(r["case"], r["dtype"], r["threads"]): r for r in self.rows()}

        def get(case, dt, t, key):
            r = rows.get((case, dt, t))
            return r.get(key) if r else None
        T = [
            (f"dense causal bf16, {hi} threads: SDPA bf16 / ours", get("dense", "bf16", hi, "sdpa_ratio"), 1.2),
            (f"dense causal bf16, {lo} thread: SDPA bf16 / ours", get("dense", "bf16", lo, "sdpa_ratio"), 1.0),
            (f"block_sparse CR {fmt_cr(cr)} bf16, {hi} threads: SDPA dense bf16 / ours",
             get("block_sparse", "bf16", hi, "sdpa_dense_ratio"), 8.0),
            (f"sliding_window CR {fmt_cr(cr)} bf16, {hi} threads: SDPA dense bf16 / ours",
             get("sliding_window", "bf16", hi, "sdpa_dense_ratio"), 8.0),
            (f"block_sparse CR {fmt_cr(cr)} bf16: ours {lo} -> {hi} threads speed-up",
             get("block_sparse", "bf16", hi, "scaling"), 13.0),
            (f"sliding_window CR {fmt_cr(cr)} bf16: ours {lo} -> {hi} threads speed-up",
             get("sliding_window", "bf16", hi, "scaling"), 13.0),
            (f"dense causal fp32, {lo} thread: SDPA fp32 / ours", get("dense", "fp32", lo, "sdpa_ratio"), 1.0),
            (f"dense causal fp32, {hi} threads: SDPA fp32 / ours", get("dense", "fp32", hi, "sdpa_ratio"), 1.5),
            (f"decode bf16 n={dn} Hq={DEC_HQ}/Hkv={DEC_HKV}, {hi} threads: SDPA bf16 / ours",
             get("decode", "bf16", hi, "sdpa_ratio"), 2.5),
        ]
        lines = ["| target | measured | needed | result |", "|---|---:|---:|---|"]
        npass = nmeas = 0
        for what, v, need in T:
            if num(v) is None:
                res = "not measured"
            else:
                nmeas += 1
                ok = v >= need
                npass += ok
                res = "PASS" if ok else "MISS"
            lines.append(f"| {what} | {fmt_ratio(v) or 'n/a'} | >= {need:g} | {res} |")
        off = []
        if n != 16384:
            off.append(f"prefill n={n} (targets: 16384)")
        if cr != 10:
            off.append(f"CR {fmt_cr(cr)} (targets: 10)")
        if dn != 131072:
            off.append(f"decode n={dn} (targets: 131072)")
        if lo != 1 or hi != 16:
            off.append(f"threads {lo} and {hi} (targets: 1 and 16)")
        summary = f"{npass} of {nmeas} measured targets pass ({len(T)} targets)."
        if off:
            summary += " This run differs from the target conditions: " + ", ".join(off) + "."
        return lines, summary

    def markdown(self):
        runs = self.doc["runs"]
        r0 = runs[0] if runs else {}
        out = ["# sparse_attn vs PyTorch CPU attention", ""]
        dates = sorted({r.get("date", "") for r in runs if r.get("date")})
        out.append(f"- date: {', '.join(dates) or 'n/a'}")
        cpus = sorted({f"{r.get('cpu_model', '?')} ({r.get('cpus', '?')} CPUs; "
                       f"{r.get('cpu_flags') or 'no avx512_bf16/amx flags'})" for r in runs})
        out.append(f"- CPU: {'; '.join(cpus) or 'n/a'}")
        tv = sorted({f"{r['torch'].get('torch')} (cpu capability "
                     f"{r['torch'].get('cpu_capability', '?')}, mkldnn {r['torch'].get('mkldnn', '?')})"
                     for r in runs if r.get("torch")})
        out.append(f"- torch: {'; '.join(tv) or 'not run'}")
        bc = sorted({f"{r['bench_context'].get('sparse_attn_cpu_target', '?')} kernels, ISA "
                     f"{r['bench_context'].get('sparse_attn_isa', '?')}"
                     for r in runs if r.get("bench_context")})
        out.append(f"- sparse_attn_bench: {'; '.join(bc) or 'not run'}")
        out.append(f"- threads: {', '.join(str(t) for t in self.threads)}")
        out.append(f"- shapes: prefill H={HEADS}, d={DIM}, causal, n={self.n}, sparse cases at CR "
                   f"{fmt_cr(self.cr)}; decode Hq={DEC_HQ}, Hkv={DEC_HKV}, d={DIM}, n={self.dn}")
        reps = sorted({f"{r.get('repeats')} (ours: --benchmark_repetitions, --benchmark_min_time="
                       f"{r.get('min_time'):g}"
                       + ("" if r.get("dry_run") else
                          f"; torch: after {r.get('warmup')} warm-up call, at most "
                          f"{r.get('case_budget'):g} s of timed calls per case") + ")"
                       for r in runs if r.get("repeats") is not None})
        out.append(f"- medians of: {'; '.join(reps)}")
        for r in runs:
            out.append(f"- command: `{r.get('command', '?')}`")
        out += ["", "dtypes: " + "; ".join(f"`{d}`: {DTYPE_TEXT[d]}" for d in self.dtypes) + ".", ""]
        out += ["## Results (ms per call; ratios > 1: ours faster)", ""] + self.table()
        out += ["", f"`ours {self.lo}->T`: ours at {self.lo} thread(s) over ours at T. `SDPA dense / ours`: "
                "torch's dense causal SDPA (same dtype and T) over our sparse time. Flex times exclude "
                "compilation and, for causal and sliding window, BlockMask creation; the block_sparse "
                "Flex time includes the selection and BlockMask.from_kv_blocks, as ours includes its "
                "selection.", ""]
        if "roofline" in self.cases or any(k.startswith("roofline/") for v in self.doc["ours"].values() for k in v):
            out += ["## Rooflines (same run)", ""] + self.roofline_table() + [""]
        tl, summary = self.targets()
        out += ["## Targets", ""] + tl + ["", summary, ""]
        return "\n".join(out)


def cpu_info():
    model, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    want = ("avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
    return model, " ".join(f for f in want if f in flags)


def plot(report, outdir):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing; no thread_scaling.png")
        return
    rows = report.rows()
    cases = [(c, dt) for c in report.cases if c != "roofline" for dt in report.dtypes]
    if not cases or len(report.threads) < 1:
        return
    cols = min(3, len(cases))
    nrows = math.ceil(len(cases) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.6 * nrows), squeeze=False)
    for ax, (case, dt) in zip(axes.flat, cases):
        rs = sorted((r for r in rows if r["case"] == case and r["dtype"] == dt), key=lambda r: r["threads"])
        for key, label in (("ours", "sparse_attn"), ("sdpa", "torch SDPA"), ("flex", "torch Flex"),
                           ("sdpa_dense", "torch SDPA dense")):
            pts = [(r["threads"], r[key]) for r in rs if num(r[key]) is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
        base = [(r["threads"], r["ours"]) for r in rs if num(r["ours"]) is not None]
        if base:
            ts = [r["threads"] for r in rs]
            ax.plot(ts, [base[0][1] * base[0][0] / x for x in ts], "k:", lw=0.8, label="linear scaling")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{report.case_title(case)}, {dt}", fontsize=8)
        ax.set_xlabel("threads")
        ax.set_ylabel("ms")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(cases):]:
        ax.axis("off")
    fig.tight_layout()
    path = os.path.join(outdir, "thread_scaling.png")
    fig.savefig(path, dpi=110)
    log(f"wrote {path}")


def write_outputs(doc, args, final):
    os.makedirs(args.outdir, exist_ok=True)
    jpath = os.path.join(args.outdir, "compare_torch.json")
    tmp = jpath + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, jpath)
    if not final:
        return
    report = Report(doc)
    md = report.markdown()
    mpath = os.path.join(args.outdir, "compare_torch.md")
    with open(mpath, "w") as f:
        f.write(md)
    print(md, flush=True)
    log(f"wrote {mpath} and {jpath}")
    if not args.no_plot:
        plot(report, args.outdir)


def find_bench(path):
    cands = [path] if path else ["build/benchmarks/sparse_attn_bench",
                                 "build-test/benchmarks/sparse_attn_bench"]
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def merge(paths, args):
    doc = None
    for p in paths:
        with open(p) as f:
            d = json.load(f)
        if d.get("schema") != SCHEMA:
            raise SystemExit(f"compare_torch.py: {p} is not a compare_torch.json of this version")
        if doc is None:
            doc = {"schema": SCHEMA, "params": dict(d["params"]), "runs": [], "ours": {}, "torch": {}}
        for k in ("n", "decode_n", "cr", "gemm_n"):
            if d["params"].get(k) != doc["params"].get(k):
                log(f"WARNING: {p} has {k}={d['params'].get(k)}, the first file "
                    f"{doc['params'].get(k)}; the report uses the first")
        pm = doc["params"]
        pm["threads"] = sorted(set(pm.get("threads", [])) | set(d["params"].get("threads", [])))
        pm["dtypes"] = [x for x in ALL_DTYPES if x in pm.get("dtypes", []) or x in d["params"].get("dtypes", [])]
        pm["cases"] = [x for x in ALL_CASES if x in pm.get("cases", []) or x in d["params"].get("cases", [])]
        doc["runs"] += d["runs"]
        for part in ("ours", "torch"):
            for t, recs in d[part].items():
                doc[part].setdefault(t, {}).update(recs)
    return doc


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "--_worker":
        return worker_main(json.loads(argv[1]))
    args = parse_args(argv)
    if args.merge:
        write_outputs(merge(args.merge, args), args, final=True)
        return 0
    have_torch = importlib.util.find_spec("torch") is not None
    if not have_torch and not args.dry_run:
        print("compare_torch.py: PyTorch is not installed; skipping the comparison "
              "(install torch >= 2.5 for SDPA enable_gqa and FlexAttention on CPU, or pass --dry-run).")
        return 0
    bench = None
    if not args.ours_json:
        bench = find_bench(args.bench)
        if bench is None:
            log("sparse_attn_bench not found; build it (cmake --build build --target "
                "sparse_attn_bench) or pass --bench PATH")
            return 2
    cpus = os.cpu_count() or 1
    over = [t for t in args.thread_list if t > cpus]
    if over:
        log(f"note: {over} threads exceed this machine's {cpus} CPUs (oversubscribed)")
    model, flags = cpu_info()
    run = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "command": " ".join(shlex.quote(a) for a in ["python3", "benchmarks/compare_torch.py"] + argv),
           "cpu_model": model, "cpus": cpus, "cpu_flags": flags, "bench": bench,
           "repeats": args.repeats, "warmup": args.warmup, "case_budget": args.case_budget,
           "min_time": args.min_time, "dry_run": args.dry_run, "torch": None, "bench_context": None}
    doc = {"schema": SCHEMA,
           "params": {"n": args.n, "decode_n": args.decode_n, "cr": args.cr, "gemm_n": args.gemm_n,
                      "threads": args.thread_list, "dtypes": args.dtype_list, "cases": args.case_list},
           "runs": [run], "ours": {}, "torch": {}}
    save = lambda: write_outputs(doc, args, final=False)
    log(f"{model}, {cpus} CPUs; prefill n={args.n}, decode n={args.decode_n}, CR {fmt_cr(args.cr)}, "
        f"threads {args.thread_list}, dtypes {args.dtype_list}, cases {args.case_list}"
        + ("" if have_torch and not args.dry_run else "; torch not run"))
    names = our_names(args.case_list, args.n, args.decode_n, args.cr, args.dtype_list)
    t_start = time.time()

    if args.ours_json:
        for p in args.ours_json:
            with open(p) as f:
                t, ctx, res = parse_bench_json(json.load(f))
            if t is None:
                raise SystemExit(f"compare_torch.py: {p} has no context.sparse_attn_threads")
            doc["ours"].setdefault(str(t), {}).update(res)
            run["bench_context"] = ctx
            missing = [x for x in names if x not in res]
            if missing:
                log(f"{p} ({t} threads) lacks {missing}")

    deadline = t_start + args.time_limit if args.time_limit > 0 else None
    # Ours at every thread count, then torch's SDPA and GEMM cases, then FlexAttention (slow to
    # compile, crash-prone, and no target depends on it): under --time-limit the last is lost first.
    if not args.ours_json:
        for t in args.thread_list:
            ctx, res = run_ours(bench, t, names, "roofline" in args.case_list, args, deadline)
            if ctx is not None:
                run["bench_context"] = ctx
            doc["ours"][str(t)] = res
            save()
    if have_torch and not args.dry_run:
        for flex in (False, True):
            for t in args.thread_list:
                jobs = torch_jobs(args, t, doc["ours"], flex)
                if not jobs:
                    continue
                log(f"{t} thread(s): torch {'FlexAttention' if flex else 'SDPA and GEMM'}, "
                    f"{len(jobs)} cases ...")
                t0 = time.time()
                info = run_torch(jobs, t, args, doc["torch"].setdefault(str(t), {}), save, deadline)
                if info:
                    run["torch"] = info
                log(f"{t} thread(s): torch done in {time.time() - t0:.0f} s")
                save()
    log(f"all done in {time.time() - t_start:.0f} s")
    write_outputs(doc, args, final=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
