// sparse_attn_bench_dist: context-parallel decode and prefill over MPI (include/sparse_attn/dist/),
// timed at one rank count per launch; run it under mpirun at several counts and feed the JSON lines
// to benchmarks/cp_model.py (docs/DISTRIBUTED.md, section "Scaling").
//
//   mpirun -np P sparse_attn_bench_dist [--mode all|pingpong|decode|prefill] [--threads T]
//       [--decode-n N] [--prefill-n N] [--steps S] [--reps R]
//
// Shapes (an 8-KV-head GQA model layer): Hq = 32, Hkv = 8, d = 128, queries fp32, K/V bf16 (an
// engine's cache format; exact fp32 products).
//  - pingpong (P >= 2): one-way latency between ranks 0 and 1 for 8 B and 1 MiB messages: the
//    alpha and beta of the model.
//  - decode: a cache of N tokens split over the ranks; a step = one new token: broadcast of its
//    queries, append to the tail rank, selection, the decode kernel on every shard, merge of the
//    partial states. Methods: dense and Quest at CR 10. Reported: the median step (max over ranks
//    of the step's wall time) over S steps, after 3 warm-up steps.
//  - prefill: N tokens in the zig-zag layout, dist::prefill with a causal and a sliding-window
//    (W = N / 16) mask; the median over R calls of the slowest rank's time.
// Each rank runs its kernels on T OpenMP threads; ranks x threads should not exceed the cores.
// Output: one JSON object per line on rank 0's stdout.
#include <sparse_attn/dist/communicator.hpp>
#include <sparse_attn/dist/decode.hpp>
#include <sparse_attn/dist/sharded_cache.hpp>
#include <sparse_attn/dist/prefill.hpp>
#include <sparse_attn/dist/zigzag.hpp>
#include <sparse_attn/sparse_attn.hpp>

#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

using namespace sparse_attn;

namespace {

constexpr index_t kHq = 32, kHkv = 8, kDim = 128;

struct Args {
  std::string mode = "all";
  int threads = 1;
  index_t decode_n = 131072;
  index_t prefill_n = 16384;
  int steps = 20;
  int reps = 3;
};

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t m = v.size() / 2;
  return v.size() % 2 != 0 ? v[m] : 0.5 * (v[m - 1] + v[m]);
}

// Slowest rank's value (the step or call ends when the last rank is done).
double max_over_ranks(double x, MPI_Comm comm) {
  MPI_Allreduce(MPI_IN_PLACE, &x, 1, MPI_DOUBLE, MPI_MAX, comm);
  return x;
}

// Deterministic values in [-1, 1) from a position-independent hash: every rank can produce the
// global tensor's entries it owns without building the whole tensor.
float hashed(std::uint64_t i, std::uint64_t salt) {
  std::uint64_t x = i * 0x9E3779B97F4A7C15ull + salt * 0xBF58476D1CE4E5B9ull;
  x ^= x >> 31, x *= 0x94D049BB133111EBull, x ^= x >> 29;
  return static_cast<float>(static_cast<std::int32_t>(x >> 32)) * (1.0f / 2147483648.0f);
}

void pingpong(const dist::Communicator& comm) {
  if (comm.size() < 2) return;
  std::vector<char> buf(1 << 20);
  double one_way[2] = {0, 0};
  const int sizes[2] = {8, 1 << 20};
  for (int s = 0; s < 2; ++s) {
    std::vector<double> t;
    for (int rep = 0; rep < 5; ++rep) {
      MPI_Barrier(comm.handle());
      const int iters = s == 0 ? 1000 : 50;
      const double t0 = now_s();
      for (int i = 0; i < iters; ++i) {
        if (comm.rank() == 0) {
          MPI_Send(buf.data(), sizes[s], MPI_CHAR, 1, 0, comm.handle());
          MPI_Recv(buf.data(), sizes[s], MPI_CHAR, 1, 0, comm.handle(), MPI_STATUS_IGNORE);
        } else if (comm.rank() == 1) {
          MPI_Recv(buf.data(), sizes[s], MPI_CHAR, 0, 0, comm.handle(), MPI_STATUS_IGNORE);
          MPI_Send(buf.data(), sizes[s], MPI_CHAR, 0, 0, comm.handle());
        }
      }
      t.push_back((now_s() - t0) / iters / 2);
    }
    one_way[s] = median(t);
  }
  if (comm.rank() == 0)
    std::printf("{\"mode\":\"pingpong\",\"ranks\":%d,\"alpha_us\":%.3f,\"beta_gbps\":%.3f}\n", comm.size(),
                one_way[0] * 1e6, (sizes[1] - sizes[0]) / (one_way[1] - one_way[0]) / 1e9);
}

// --- prefill ---------------------------------------------------------------------------------

template <class Mask>
void prefill_case(const dist::Communicator& comm, const Args& a, const char* name, const Mask& mask,
                  double pairs) {
  const index_t n = a.prefill_n;
  const dist::ZigZagLayout lay = dist::zigzag_layout(n, comm.size(), mask.shape().block_q, mask.shape().block_k);
  const index_t L = lay.local_tokens(comm.rank());
  std::vector<float> q(static_cast<std::size_t>(kHq * L * kDim)), out(q.size());
  std::vector<bf16> k(static_cast<std::size_t>(kHkv * L * kDim)), v(k.size());
  for (index_t h = 0; h < kHq; ++h)
    for (index_t i = 0; i < L; ++i) {
      const auto g = static_cast<std::uint64_t>(lay.global_position(comm.rank(), i));
      for (index_t c = 0; c < kDim; ++c)
        q[static_cast<std::size_t>((h * L + i) * kDim + c)] =
            hashed((static_cast<std::uint64_t>(h) * static_cast<std::uint64_t>(n) + g) * kDim + static_cast<std::uint64_t>(c), 1);
    }
  for (index_t h = 0; h < kHkv; ++h)
    for (index_t i = 0; i < L; ++i) {
      const auto g = static_cast<std::uint64_t>(lay.global_position(comm.rank(), i));
      for (index_t c = 0; c < kDim; ++c) {
        const std::uint64_t e = (static_cast<std::uint64_t>(h) * static_cast<std::uint64_t>(n) + g) * kDim + static_cast<std::uint64_t>(c);
        k[static_cast<std::size_t>((h * L + i) * kDim + c)] = bf16(hashed(e, 2));
        v[static_cast<std::size_t>((h * L + i) * kDim + c)] = bf16(hashed(e, 3));
      }
    }
  AttentionOptions opt;
  opt.num_threads = a.threads;
  std::vector<double> times;
  dist::PrefillStats st{};
  for (int rep = 0; rep < a.reps + 1; ++rep) {  // the first call warms up (pages, plans)
    MPI_Barrier(comm.handle());
    const double t0 = now_s();
    st = dist::prefill(comm, TensorView<const float>(q.data(), kHq, L, kDim), TensorView<const bf16>(k.data(), kHkv, L, kDim),
                       TensorView<const bf16>(v.data(), kHkv, L, kDim), TensorView<float>(out.data(), kHq, L, kDim), mask, opt);
    const double t = max_over_ranks(now_s() - t0, comm.handle());
    if (rep > 0) times.push_back(t);
  }
  // One process, one call, no dist layer (P = 1 only: the baseline of the speed-up). Rank 0's
  // local tensors then hold the sequence in order (chunks 0 and 1).
  double single_ms = 0;
  if (comm.size() == 1) {
    std::vector<double> ts;
    for (int rep = 0; rep < a.reps + 1; ++rep) {
      const double t0 = now_s();
      prefill(TensorView<const float>(q.data(), kHq, L, kDim), TensorView<const bf16>(k.data(), kHkv, L, kDim),
              TensorView<const bf16>(v.data(), kHkv, L, kDim), TensorView<float>(out.data(), kHq, L, kDim), mask, opt);
      if (rep > 0) ts.push_back(now_s() - t0);
    }
    single_ms = median(ts) * 1e3;
  }
  double bytes = static_cast<double>(st.bytes_received);
  MPI_Allreduce(MPI_IN_PLACE, &bytes, 1, MPI_DOUBLE, MPI_SUM, comm.handle());
  const double kv_bytes = static_cast<double>(n) * kHkv * 2 * kDim * 2;  // the whole sequence's bf16 K/V
  const double flops = 4.0 * kHq * kDim * pairs;                          // QK^T and PV: 2 FMAs per pair and dim
  if (comm.rank() == 0)
    std::printf("{\"mode\":\"prefill\",\"mask\":\"%s\",\"n\":%lld,\"ranks\":%d,\"threads\":%d,\"median_ms\":%.3f,"
                "\"flops\":%.6g,\"kv_bytes\":%.6g,\"bytes_received_total\":%.6g,\"gflops\":%.2f,\"single_process_ms\":%.3f}\n",
                name, static_cast<long long>(n), comm.size(), a.threads, median(times) * 1e3, flops, kv_bytes, bytes,
                flops / median(times) / 1e9, single_ms);
}

void prefill_bench(const dist::Communicator& comm, const Args& a) {
  const index_t n = a.prefill_n, w = std::max<index_t>(64, n / 16);
  const double nn = static_cast<double>(n);
  prefill_case(comm, a, "causal", masks::causal(kHq, n, n), nn * (nn + 1) / 2);
  // Window W keys including the query's own: pairs = sum_i min(i + 1, W).
  const double wd = static_cast<double>(w);
  prefill_case(comm, a, "window", masks::sliding_window(kHq, n, n, w, 0), wd * (wd + 1) / 2 + (nn - wd) * wd);
}


// --- decode ----------------------------------------------------------------------------------

void decode_case(const dist::Communicator& comm, const Args& a, const char* name, const dist::StepPolicy& policy) {
  const index_t n = a.decode_n, page = 16;
  const int warmup = 3;
  const dist::TokenRange range = dist::shard_range(n, page, comm.rank(), comm.size());
  const index_t mine = range.end - range.begin;
  // This rank's prompt K/V, head-major [Hkv][mine][d] (the global tensor's rows it owns).
  std::vector<bf16> k(static_cast<std::size_t>(kHkv * mine * kDim)), v(k.size());
  for (index_t h = 0; h < kHkv; ++h)
    for (index_t i = 0; i < mine; ++i)
      for (index_t c = 0; c < kDim; ++c) {
        const std::uint64_t e = (static_cast<std::uint64_t>(h) * static_cast<std::uint64_t>(n) +
                                 static_cast<std::uint64_t>(range.begin + i)) * kDim + static_cast<std::uint64_t>(c);
        k[static_cast<std::size_t>((h * mine + i) * kDim + c)] = bf16(hashed(e, 4));
        v[static_cast<std::size_t>((h * mine + i) * kDim + c)] = bf16(hashed(e, 5));
      }
  dist::ShardedCacheOptions copt;
  copt.kv_heads = kHkv;
  copt.head_dim = kDim;
  copt.page_size = page;
  copt.decode_capacity = a.steps + warmup;
  dist::ShardedCache<bf16> cache(comm, copt, range.begin, TensorView<const bf16>(k.data(), kHkv, mine, kDim),
                                 TensorView<const bf16>(v.data(), kHkv, mine, kDim));
  k = {};
  v = {};
  std::vector<float> q(static_cast<std::size_t>(kHq * kDim)), out(q.size());
  std::vector<bf16> kn(static_cast<std::size_t>(kHkv * kDim)), vn(kn.size());
  DecodeOptions opt;
  opt.num_threads = a.threads;
  std::vector<double> times;
  dist::StepStats st;
  for (int step = 0; step < a.steps + warmup; ++step) {
    for (std::size_t i = 0; i < q.size(); ++i) q[i] = 2.0f * hashed(i + q.size() * static_cast<std::size_t>(step), 6);
    for (std::size_t i = 0; i < kn.size(); ++i) {
      kn[i] = bf16(hashed(i + kn.size() * static_cast<std::size_t>(step), 7));
      vn[i] = bf16(hashed(i + kn.size() * static_cast<std::size_t>(step), 8));
    }
    MPI_Barrier(comm.handle());
    const double t0 = now_s();
    dist::decode_step(cache, TensorView<const float>(q.data(), kHq, 1, kDim), TensorView<const bf16>(kn.data(), kHkv, 1, kDim),
                      TensorView<const bf16>(vn.data(), kHkv, 1, kDim), TensorView<float>(out.data(), kHq, 1, kDim), policy,
                      opt, &st);
    const double t = max_over_ranks(now_s() - t0, comm.handle());
    if (step >= warmup) times.push_back(t);
  }
  // The model's byte counts: K/V rows read (plus Quest's page bounds: min and max per page and KV
  // head), the broadcast queries, the gathered partials, Quest's candidate exchange.
  const double kv_bytes = static_cast<double>(st.global_kv_rows) * 2 * kDim * 2 +
                          (policy.kind == dist::StepPolicy::Kind::quest
                               ? static_cast<double>(n / page) * kHkv * 2 * kDim * 2 : 0.0);
  double sel_bytes = 0;
  for (index_t b : st.budget_pages) sel_bytes += 8.0 * static_cast<double>(b);
  if (comm.rank() == 0)
    std::printf("{\"mode\":\"decode\",\"method\":\"%s\",\"n\":%lld,\"ranks\":%d,\"threads\":%d,\"median_ms\":%.4f,"
                "\"kv_bytes\":%.6g,\"q_bytes\":%d,\"merge_bytes\":%d,\"sel_bytes\":%.6g,\"compression\":%.3f,\"gbps\":%.2f}\n",
                name, static_cast<long long>(n), comm.size(), a.threads, median(times) * 1e3, kv_bytes,
                static_cast<int>(kHq * kDim * 4), static_cast<int>(kHq * (kDim + 1) * 4), sel_bytes * comm.size(),
                st.compression(), kv_bytes / median(times) / 1e9);
}

void decode_bench(const dist::Communicator& comm, const Args& a) {
  decode_case(comm, a, "dense", dist::StepPolicy{});
  decode_case(comm, a, "quest", dist::StepPolicy::quest(methods::Budget::compression(10)));
}

}  // namespace

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  Args a;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string key = argv[i];
    const char* val = argv[i + 1];
    if (key == "--mode") a.mode = val;
    else if (key == "--threads") a.threads = std::atoi(val);
    else if (key == "--decode-n") a.decode_n = std::atoll(val);
    else if (key == "--prefill-n") a.prefill_n = std::atoll(val);
    else if (key == "--steps") a.steps = std::atoi(val);
    else if (key == "--reps") a.reps = std::atoi(val);
    else {
      std::fprintf(stderr, "sparse_attn_bench_dist: unknown option %s\n", key.c_str());
      MPI_Abort(MPI_COMM_WORLD, 2);
    }
  }
  const dist::Communicator comm;
  if (a.mode == "all" || a.mode == "pingpong") pingpong(comm);
  if (a.mode == "all" || a.mode == "decode") decode_bench(comm, a);
  if (a.mode == "all" || a.mode == "prefill") prefill_bench(comm, a);
  MPI_Finalize();
  return 0;
}
