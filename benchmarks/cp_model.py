#!/usr/bin/env python3
"""Cost model of context-parallel decode and prefill (docs/DISTRIBUTED.md, section "Cost model").

Reads the JSON lines of `sparse_attn_bench_dist` (one object per measured configuration), fits the
model's per-node constants from the 1-rank points, checks its predictions against every measured
multi-rank point, and predicts the decode step and prefill time for clusters of 8-64 nodes at
1M-10M tokens on a 100 Gb/s network.

The model (one attention call: one layer, one decode step of n_q tokens, or one prefill):

  decode step  T(P) = T_fixed + bytes_kv / P / BW_rank(P) + C_q(P) + C_sel(P) + C_merge(P)
    bytes_kv   = keys_read * Hkv * (d + dv) * 2         (bf16 K and V rows the kernel reads;
                 Quest adds its per-page min/max: pages * Hkv * 2 d * 2)
    BW_rank(P) = the node's decode read bandwidth BW_node divided among the ranks on one node
    C_x(P)     = ceil(log2 P) * (alpha + m_x / beta)    (a binomial tree of messages of m_x bytes)
                 m_q = Hq n_q d 4 (the queries, broadcast), m_merge = Hq n_q (dv + 1) 4 (one
                 partial output + LSE, reduced), m_sel = Quest's candidate exchange (reported by
                 the bench as sel_bytes)
  prefill      T(P) = sum over the P ring steps of max(compute_s, alpha + m_s / beta)
    compute_s  = flops_s / F_rank(P), flops of the causal pairs a rank owns in step s (zig-zag:
                 every rank owns ~1/P of the 2 Hq d n^2 multiply-adds), m_s = the K/V chunk pair
                 received in step s = 2 (n / P) Hkv (d + dv) 2 bytes

Usage: cp_model.py bench_dist.jsonl [--alpha-us 2 --beta-gbps 12.5 --node-bw-gbps X --node-gflops Y]
"""
import argparse
import json
import math
import sys


def tree(p, alpha, beta, m):
    """Latency of a binomial-tree broadcast or reduce of m bytes over p ranks."""
    return 0.0 if p <= 1 else math.ceil(math.log2(p)) * (alpha + m / beta)


def decode_step(pt, p, ranks_per_node, bw_node, t_fixed, alpha, beta):
    """Predicted decode step time (s) for the configuration pt at p ranks."""
    bw_rank = bw_node / ranks_per_node
    compute = pt["kv_bytes"] / p / bw_rank
    comm = (tree(p, alpha, beta, pt["q_bytes"]) + tree(p, alpha, beta, pt["merge_bytes"]) +
            tree(p, alpha, beta, pt.get("sel_bytes", 0)))
    return t_fixed + compute + comm


def prefill_time(pt, p, ranks_per_node, f_node, alpha, beta):
    """Predicted prefill time (s): P ring steps, each the slower of its compute and its message."""
    f_rank = f_node / ranks_per_node
    per_step_flops = pt["flops"] / p / p  # zig-zag: each rank's share, spread over P steps
    msg = pt["kv_bytes"] / p              # one rank's K/V (two chunks) travels per step
    steps = [per_step_flops / f_rank] + [max(per_step_flops / f_rank, alpha + msg / beta)] * (p - 1)
    return sum(steps)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("jsonl")
    ap.add_argument("--alpha-us", type=float, default=2.0, help="network latency per message (us)")
    ap.add_argument("--beta-gbps", type=float, default=12.5, help="network bandwidth (GB/s): 100 Gb/s")
    args = ap.parse_args()
    pts = [json.loads(line) for line in open(args.jsonl) if line.strip().startswith("{")]
    link = next((x for x in pts if x["mode"] == "pingpong"), None)
    alpha_local = link["alpha_us"] * 1e-6 if link else 1e-6
    beta_local = link["beta_gbps"] * 1e9 if link else 10e9

    print("## Measured against the model (ranks on one node; shared-memory alpha %.2f us, beta %.1f GB/s)\n"
          % (alpha_local * 1e6, beta_local / 1e9))
    print("| phase | method | n | ranks x threads | measured (ms) | model (ms) | model / measured |")
    print("|---|---|---|---|---|---|---|")
    # Node constants from the 1-rank points with the same total core count (ranks x threads):
    #  BW_node: dense decode's K/V bytes / step time (memory-bound kernel);
    #  t_sel:   a selecting method's time beyond its bytes at BW_node (Quest's page scoring, one
    #           thread per rank, O(pages / P) per rank, so it divides by P);
    #  F_node:  the single-process prefill's flops / time (the kernel's rate without the dist layer).
    bw, sel, flops = {}, {}, {}
    for pt in pts:
        if pt["ranks"] != 1:
            continue
        cores = pt["threads"]
        if pt["mode"] == "decode" and pt["method"] == "dense":
            bw[(pt["n"], cores)] = pt["kv_bytes"] / (pt["median_ms"] * 1e-3)
        if pt["mode"] == "prefill" and pt.get("single_process_ms", 0) > 0:
            flops[(pt["mask"], pt["n"], cores)] = pt["flops"] / (pt["single_process_ms"] * 1e-3)
    for pt in pts:
        if pt["mode"] == "decode" and pt["ranks"] == 1 and pt["method"] != "dense":
            b = bw.get((pt["n"], pt["threads"]))
            if b:
                sel[(pt["method"], pt["n"], pt["threads"])] = max(0.0, pt["median_ms"] * 1e-3 - pt["kv_bytes"] / b)
    for pt in pts:
        if pt["mode"] not in ("decode", "prefill"):
            continue
        p, cores = pt["ranks"], pt["ranks"] * pt["threads"]
        if pt["mode"] == "decode":
            b = bw.get((pt["n"], cores))
            if b is None:
                continue
            t_sel = sel.get((pt["method"], pt["n"], cores), 0.0) / p
            model = t_sel + decode_step(pt, p, p, b, 0.0, alpha_local, beta_local)
            name = pt["method"]
        else:
            f = flops.get((pt["mask"], pt["n"], cores))
            if f is None:
                continue
            model = prefill_time(pt, p, p, f, alpha_local, beta_local)
            name = pt["mask"]
        print("| %s | %s | %d | %d x %d | %.3f | %.3f | %.2f |" % (
            pt["mode"], name, pt["n"], p, pt["threads"], pt["median_ms"], model * 1e3,
            model * 1e3 / pt["median_ms"]))

    # Cluster predictions: one rank per node, BW_node and F_node from the largest 1-rank point.
    dec = max((v, k) for k, v in bw.items())
    pre = max((v, k) for k, v in flops.items() if k[0] == "causal")
    bw_node, f_node = dec[0], pre[0]
    alpha, beta = args.alpha_us * 1e-6, args.beta_gbps * 1e9
    hq, hkv, d = 32, 8, 128
    print("\n## Predicted: one layer, one rank of %d cores per node, %.0f Gb/s, alpha %.1f us\n"
          % (dec[1][1], args.beta_gbps * 8, args.alpha_us))
    print("Node constants from the measured 1-rank points: dense decode reads %.1f GB/s, single-process causal prefill %.0f GFLOP/s.\n"
          % (bw_node / 1e9, f_node / 1e9))
    print("| n | nodes | dense decode step (ms) | of which network (us) | causal prefill (s) | prefill compute-bound |")
    print("|---|---|---|---|---|---|")
    for n in (1 << 20, 1 << 22, 10_000_000):
        for p in (8, 16, 32, 64):
            kv = n * hkv * 2 * d * 2
            dpt = {"kv_bytes": kv, "q_bytes": hq * d * 4, "merge_bytes": hq * (d + 1) * 4}
            t = decode_step(dpt, p, 1, bw_node, 0.0, alpha, beta)
            net = tree(p, alpha, beta, dpt["q_bytes"]) + tree(p, alpha, beta, dpt["merge_bytes"])
            ppt = {"flops": 2.0 * hq * d * n * n, "kv_bytes": kv}
            tp = prefill_time(ppt, p, 1, f_node, alpha, beta)
            bound = ppt["flops"] / p / p / f_node >= alpha + kv / p / beta
            print("| %s | %d | %.3f | %.1f | %.1f | %s |" % (
                f"{n / 1e6:.1f}M", p, t * 1e3, net * 1e6, tp, "yes" if bound else "no (network)"))


if __name__ == "__main__":
    sys.exit(main())
