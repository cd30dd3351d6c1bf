// cp_decode_mpi: context-parallel decode of one layer over MPI ranks, as an engine runs it.
// The prompt's K/V are split over the ranks by token range (each rank holds only its shard), SnapKV
// evicts the prompt with a global budget (the same tokens a single process keeps), then every
// decode step broadcasts the new token's queries from rank 0, appends its K/V to the last rank,
// selects Quest's global top-B pages on every shard and merges the partial results on rank 0.
// At small sizes rank 0 also replays the same steps in a single process and compares.
//
// Usage: mpirun -np 4 ./cp_decode_mpi [prompt_tokens] [steps]   (defaults 16384 8)
#include <sparse_attn/dist/decode.hpp>
#include <sparse_attn/dist/eviction.hpp>
#include <sparse_attn/methods/quest.hpp>
#include <sparse_attn/methods/snapkv.hpp>
#include <sparse_attn/sparse_attn.hpp>

#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

using namespace sparse_attn;

namespace {
// Deterministic data: every rank can make any token's K/V (here, only its own range's).
std::vector<float> random_values(std::size_t n, std::uint64_t seed) {
  std::vector<float> x(n);
  std::uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  for (float& e : x) {
    s ^= s << 13, s ^= s >> 7, s ^= s << 17;
    e = static_cast<float>(static_cast<std::int32_t>(s >> 32)) / 2147483648.0f;
  }
  return x;
}
}  // namespace

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  const index_t n = argc > 1 ? std::atoll(argv[1]) : 16384;
  const index_t steps = argc > 2 ? std::atoll(argv[2]) : 8;
  const index_t Hkv = 4, G = 4, Hq = Hkv * G, d = 64, P = 16, window = 32;
  int status = 0;
  {
    dist::Communicator comm;  // MPI_COMM_WORLD
    if (n < window || steps < 1) {
      if (comm.rank() == 0) std::fprintf(stderr, "usage: cp_decode_mpi [prompt_tokens >= 32] [steps >= 1]\n");
      MPI_Finalize();
      return 2;
    }
    // 1. This rank's share of the prompt: whole pages, balanced. In an engine these K/V come out of
    //    the (context-parallel) prefill of the same range.
    const dist::TokenRange range = dist::shard_range(n, P, comm.rank(), comm.size());
    const index_t mine = range.end - range.begin;
    const std::vector<float> k_all = random_values(static_cast<std::size_t>(Hkv * n * d), 1);
    const std::vector<float> v_all = random_values(static_cast<std::size_t>(Hkv * n * d), 2);
    const TensorView<const float> k(k_all.data(), Hkv, n, d), v(v_all.data(), Hkv, n, d);
    dist::ShardedCacheOptions opt;
    opt.kv_heads = Hkv;
    opt.head_dim = d;
    opt.page_size = P;
    opt.decode_capacity = steps;  // the last rank receives every generated token
    dist::ShardedCache<bf16> cache(comm, opt, range.begin, k.slice_tokens(range.begin, mine),
                                   v.slice_tokens(range.begin, mine));

    // 2. SnapKV after prefill, 1/8 of the prompt kept per head over all ranks. The window's
    //    queries are the prompt's last 32 (rank 0's copy is used).
    const std::vector<float> q_window = random_values(static_cast<std::size_t>(Hq * window * d), 3);
    const TensorView<const float> qw(q_window.data(), Hq, window, d);
    const methods::Budget keep = methods::Budget::compression(8.0);
    const dist::EvictionStats ev = dist::evict_snapkv(cache, methods::SnapKV{}, qw, keep);
    if (comm.rank() == 0)
      std::printf("prompt %lld tokens over %d ranks; SnapKV kept %lld per head (%lld on this rank)\n",
                  static_cast<long long>(n), comm.size(), static_cast<long long>(ev.per_head),
                  static_cast<long long>(cache.local().length(0)));

    // Optional oracle on rank 0 at small sizes: the same steps on one process.
    const bool check = n <= 8192;
    kv::CacheOptions so;
    so.kv_heads = Hkv;
    so.head_dim = d;
    so.page_size = P;
    so.capacity = check ? n + steps : 1;
    kv::ContiguousCache<bf16> single(so);
    if (check && comm.rank() == 0) {
      single.append(k, v);
      methods::evict(methods::SnapKV{}, qw, single, keep);
    }

    // 3. Decode steps: Quest with 512 tokens (32 pages) besides the current page.
    const dist::StepPolicy quest = dist::StepPolicy::quest(methods::Budget::count(512));
    std::vector<float> out(static_cast<std::size_t>(Hq * d)), ref(out.size());
    for (index_t s = 0; s < steps; ++s) {
      const std::vector<float> qs = random_values(out.size(), 100 + 3 * s);
      const std::vector<float> ks = random_values(static_cast<std::size_t>(Hkv * d), 101 + 3 * s);
      const std::vector<float> vs = random_values(static_cast<std::size_t>(Hkv * d), 102 + 3 * s);
      const TensorView<const float> q(qs.data(), Hq, 1, d), kn(ks.data(), Hkv, 1, d), vn(vs.data(), Hkv, 1, d);
      dist::StepStats st;
      MPI_Barrier(comm.handle());
      const auto t0 = std::chrono::steady_clock::now();
      dist::decode_step(cache, q, kn, vn, TensorView<float>(out.data(), Hq, 1, d), quest, {}, &st);
      const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      if (comm.rank() != 0) continue;
      std::printf("step %lld: %lld keys read over all ranks (%lld here), CR %.1f, %.2f ms", static_cast<long long>(s),
                  static_cast<long long>(st.global_kv_rows), static_cast<long long>(st.local_kv_rows),
                  st.compression(), ms);
      if (check) {
        single.append(kn, vn);
        const KeySelection sel = methods::Quest{}.select(q, single, methods::Budget::count(512)).keys;
        decode(q, single, TensorView<float>(ref.data(), Hq, 1, d), sel);
        float diff = 0, scale = 0;
        for (std::size_t i = 0; i < out.size(); ++i) {
          diff = std::max(diff, std::abs(out[i] - ref[i]));
          scale = std::max(scale, std::abs(ref[i]));
        }
        const bool ok = diff <= 1e-5f * std::max(scale, 1e-30f);
        std::printf(", max |out - single process| %.1e %s", static_cast<double>(diff), ok ? "ok" : "FAILED");
        if (!ok) status = 1;
      }
      std::printf("\n");
    }
  }
  MPI_Bcast(&status, 1, MPI_INT, 0, MPI_COMM_WORLD);
  MPI_Finalize();
  return status;
}
