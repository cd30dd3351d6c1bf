// engine_layer: what an inference engine does with sparse_attn for one sequence, layer by layer.
//
//   1. Chunked prefill. The engine's K/V projections write into its own token-major bf16 KV
//      buffer ([token][kv head][dim], as most engines store it). Each chunk's queries (a suffix
//      of the keys written so far) attend to that buffer in place through strided TensorViews:
//      no copy, no repacking. Vertical-Slash (MInference) selects each chunk's mask at a target
//      compression; the prefill kernel executes it.
//   2. After the prompt's last chunk, per layer: the prompt's K/V go into a paged decode cache
//      (kv::PagedCache<bf16>, which keeps Quest's per-page key bounds), and SnapKV evicts down
//      to that layer's compression target, scoring keys with the last prompt queries. The
//      targets split one total CR over the layers (methods::layer_compressions) with
//      PyramidKV's shape: lower layers keep more, upper layers less, the total kept the same.
//   3. Decode steps: each layer appends the new token's K/V, Quest picks the pages the token
//      reads, and the decode kernel reads them from the pages in place. Each step prints the keys
//      a query read and the achieved compression (CR) against dense attention over the whole
//      sequence (eviction included), and the error against dense decoding over the engine's full
//      token-major buffer.
// Memory: one workspace serves every kernel call of every layer and step. It is allocated once,
// sized up front from the largest calls. Plans are cheap (no K/V access): prefill plans one per
// (chunk, layer), since every mask differs; a decode plan is reused by the next layers while
// their selections read as many keys per head.
//
// Data: a stand-in for a model. Q/K/V rows are a slowly drifting per-position signal (nearby
// tokens attend to each other, as RoPE'd heads do) plus noise, with different noise in each layer.
//
// Usage: engine_layer [prompt_tokens] [decode_steps] [layers] [chunk]
//   defaults 8192 16 4 2048, with Hq = 32, Hkv = 8, d = 128 (a Llama-3-8B layer).
// Exits 1 when an output is not finite, or when a call needs more workspace than was allocated.
#include <sparse_attn/sparse_attn.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

using namespace sparse_attn;
using methods::Budget;

namespace {

constexpr index_t Hq = 32, Hkv = 8, d = 128;
constexpr double kPrefillCR = 10, kSnapKvCR = 4, kQuestCR = 4;  // targets (SnapKV: the total)
constexpr double kPyramidRatio = 2;  // SnapKV: the first layer's share of tokens over the last's

// ---- The stand-in for a model: the rows its projections would produce. ----
float noise(std::uint64_t x) {  // splitmix64 -> uniform, variance 1
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  x ^= x >> 31;
  return static_cast<float>(static_cast<double>(x >> 40) / 8388608.0 - 1.0) * 1.7320508f;
}

struct Model {
  index_t total;
  std::vector<float> signal;  // [total][d], AR(1) along positions
  explicit Model(index_t tokens) : total(tokens), signal(static_cast<std::size_t>(tokens * d)) {
    for (index_t t = 0; t < total; ++t)
      for (index_t c = 0; c < d; ++c)
        signal[t * d + c] = (t > 0 ? 0.98f * signal[(t - 1) * d + c] : 0.0f) +
                            0.2f * noise(static_cast<std::uint64_t>(t * d + c));
  }
  // Rows of tokens [t0, t0 + count) for `heads` heads, token-major [count][heads][d], as bf16.
  // kind: 0 = Q, 1 = K, 2 = V.
  void rows(index_t layer, int kind, index_t t0, index_t count, index_t heads, bf16* out) const {
    const float amp = kind == 2 ? 0.0f : 1.0f;
    for (index_t t = t0; t < t0 + count; ++t)
      for (index_t h = 0; h < heads; ++h)
        for (index_t c = 0; c < d; ++c) {
          const auto key =
              static_cast<std::uint64_t>((((layer * 3 + kind) * total + t) * heads + h) * d + c);
          out[((t - t0) * heads + h) * d + c] =
              bf16(amp * signal[t * d + c] + noise(key + (1ull << 62)));
        }
  }
};

bool all_finite(const std::vector<float>& x) {
  return std::all_of(x.begin(), x.end(), [](float e) { return std::isfinite(e); });
}

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main(int argc, char** argv) {
  const index_t n = argc > 1 ? std::atoll(argv[1]) : 8192;   // prompt tokens
  const index_t steps = argc > 2 ? std::atoll(argv[2]) : 16;  // decode steps
  const index_t layers = argc > 3 ? std::atoll(argv[3]) : 4;
  const index_t chunk = argc > 4 ? std::atoll(argv[4]) : 2048;  // prefill chunk
  if (n < 1 || steps < 1 || layers < 1 || chunk < 1) {
    std::fprintf(stderr, "usage: engine_layer [prompt_tokens] [decode_steps] [layers] [chunk]\n");
    return 2;
  }
  const index_t capacity = n + steps;
  const Model model(capacity);
  std::printf(
      "%lld layers, Hq=%lld Hkv=%lld d=%lld bf16, prompt %lld tokens in chunks of %lld, "
      "%lld decode steps; CPU target %s\n",
      static_cast<long long>(layers), static_cast<long long>(Hq), static_cast<long long>(Hkv),
      static_cast<long long>(d), static_cast<long long>(n), static_cast<long long>(chunk),
      static_cast<long long>(steps), target_name(cpu_target()));

  // The engine's KV buffers, token-major [token][Hkv][d] per layer, and views over them in place.
  const auto row_elems = static_cast<std::size_t>(Hkv * d);
  std::vector<std::vector<bf16>> kbuf(static_cast<std::size_t>(layers)), vbuf(kbuf.size());
  auto kv_view = [&](const std::vector<bf16>& buf, index_t tokens) {
    return TensorView<const bf16>::token_major(buf.data(), Hkv, tokens, d);
  };
  for (auto* b : {&kbuf, &vbuf})
    for (auto& layer : *b) layer.resize(static_cast<std::size_t>(capacity) * row_elems);

  AttentionOptions opt;  // the default executor (OpenMP); see custom_threads.cpp for your own
  DecodeOptions dopt;

  // One workspace for everything, sized before the first call by the largest ones: a prefill of a
  // full chunk against the whole prompt and a dense decode over the whole sequence. The masks are
  // not known yet (each layer's selection depends on its Q/K); upper bounds stand in for them: a
  // dense causal mask, and for vertical_slash's LineMask (its kernel transposes one KV head's K/V
  // and gathers its heads' columns) the line mask with every column and every diagonal. Every
  // call below checks that its plan fits.
  const index_t q_max = std::min(chunk, n);
  const AttentionShape prefill_max{
      Hq, Hkv, q_max, n, d, d, DType::bfloat16, DType::bfloat16, DType::bfloat16};
  const AttentionShape decode_max{
      Hq, Hkv, 1, capacity, d, d, DType::bfloat16, DType::bfloat16, DType::bfloat16};
  const auto flags = static_cast<std::size_t>(Hq * n);
  const LineMask every_line(MaskShape{Hq, q_max, n, 64, 64, true}, std::vector<std::uint8_t>(flags, 1),
                            std::vector<std::uint8_t>(flags, 1));
  const WorkspaceBuffer workspace(
      std::max({plan_prefill(prefill_max, masks::causal(Hq, q_max, n), opt).workspace_bytes(),
                plan_prefill(prefill_max, every_line, opt).workspace_bytes(),
                plan_decode(decode_max, KeySelection::all(), dopt).workspace_bytes()}));
  bool ok = true;
  auto fits = [&](std::size_t bytes, const char* what) {
    if (bytes <= workspace.bytes()) return true;
    std::fprintf(stderr, "FAIL: %s needs %zu workspace bytes, %zu were allocated\n", what, bytes,
                 workspace.bytes());
    return ok = false;
  };

  // ---- 1 + 2: chunked prefill, chunks outer and layers inner (as the forward pass runs). ----
  const methods::VerticalSlash vertical_slash;
  kv::CacheOptions co;
  co.kv_heads = Hkv;
  co.head_dim = d;
  co.capacity = capacity;
  co.page_size = 16;
  co.key_bounds = true;  // Quest's page bounds
  std::vector<kv::PagedCache<bf16>> caches;
  caches.reserve(static_cast<std::size_t>(layers));
  std::vector<bf16> qbuf(static_cast<std::size_t>(q_max * Hq * d));
  std::vector<float> out(static_cast<std::size_t>(q_max * Hq * d));
  index_t prefill_calls = 0;
  double prefill_ms = 0;
  // Per-layer SnapKV targets: layer l keeps in proportion to its pyramid weight, and the layers
  // together keep n x layers / kSnapKvCR tokens per KV head (every layer caches n tokens).
  const std::vector<double> snapkv_cr = methods::layer_compressions(
      kSnapKvCR, std::vector<double>(static_cast<std::size_t>(layers), static_cast<double>(n)),
      methods::pyramid_weights(layers, kPyramidRatio));
  for (index_t c0 = 0; c0 < n; c0 += chunk) {
    const index_t m = std::min(chunk, n - c0), end = c0 + m;
    index_t pairs = 0, dense = 0;
    for (index_t l = 0; l < layers; ++l) {
      auto& K = kbuf[static_cast<std::size_t>(l)];
      auto& V = vbuf[static_cast<std::size_t>(l)];
      // The layer's projections for this chunk: K/V rows into the engine's buffer, Q rows.
      model.rows(l, 1, c0, m, Hkv, K.data() + c0 * row_elems);
      model.rows(l, 2, c0, m, Hkv, V.data() + c0 * row_elems);
      model.rows(l, 0, c0, m, Hq, qbuf.data());
      const auto q = TensorView<const bf16>::token_major(qbuf.data(), Hq, m, d);
      const auto k = kv_view(K, end), v = kv_view(V, end);
      const auto o = TensorView<float>::token_major(out.data(), Hq, m, d);  // [token][Hq][d]

      const auto t0 = std::chrono::steady_clock::now();
      const auto sel = vertical_slash.select(q, k, Budget::compression(kPrefillCR), opt);
      const PrefillPlan plan = plan_prefill(attention_shape(q, k, v), sel.mask, opt);
      if (!fits(plan.workspace_bytes(), "prefill")) return 1;
      prefill(plan, q, k, v, o, sel.mask, workspace, opt);
      prefill_ms += ms_since(t0);
      ++prefill_calls;
      pairs += sel.mask.pairs();
      dense += sel.mask.shape().dense_pairs();
      if (!all_finite(out)) {
        std::fprintf(stderr, "FAIL: prefill output of layer %lld is not finite\n",
                     static_cast<long long>(l));
        ok = false;
      }

      if (end == n) {  // the layer's prompt is complete: paged decode cache + SnapKV
        caches.emplace_back(co);
        kv::PagedCache<bf16>& cache = caches.back();
        cache.append(kv_view(K, n), kv_view(V, n), opt.executor_choice());
        (void)methods::evict(methods::SnapKV{}, q, cache,
                             Budget::compression(snapkv_cr[static_cast<std::size_t>(l)]), opt);
      }
    }
    std::printf(
        "prefill chunk [%6lld, %6lld): vertical_slash CR %5.2f (target %.0f; dense pairs / "
        "computed, all layers)\n",
        static_cast<long long>(c0), static_cast<long long>(end), compression_ratio(dense, pairs),
        kPrefillCR);
  }
  index_t cached = 0;
  std::printf("snapkv after prefill, tokens kept per KV head (layer target CR):");
  for (index_t l = 0; l < layers; ++l) {
    const index_t kept = caches[static_cast<std::size_t>(l)].length(0);
    cached += kept;
    std::printf(" %lld (%.2f)", static_cast<long long>(kept), snapkv_cr[static_cast<std::size_t>(l)]);
  }
  std::printf("; all layers CR %.2f (total target %.0f)\n",
              static_cast<double>(n * layers) / static_cast<double>(cached), kSnapKvCR);

  // ---- 3: decode steps, layers inner. ----
  const methods::Quest quest;
  methods::QuestPages pages;     // Quest's per-step scratch, reused by every layer and step
  methods::DecodeSelection sel;  // reused too
  DecodePlan dplan;
  std::vector<index_t> planned_keys;  // keys per KV head dplan was made for (empty: none yet)
  std::vector<index_t> keys(static_cast<std::size_t>(Hkv));  // this call's
  KeySelection::Scope planned_scope = KeySelection::Scope::all;
  index_t decode_plans = 0, decode_calls = 0;
  std::vector<bf16> q1(static_cast<std::size_t>(Hq * d));
  std::vector<float> o1(static_cast<std::size_t>(Hq * d)), ref(o1.size());
  double decode_ms = 0;
  for (index_t s = 0; s < steps; ++s) {
    const index_t t = n + s;  // the new token's position
    index_t pairs = 0, dense = 0, plans_before = decode_plans;
    double err = 0, norm = 0;
    for (index_t l = 0; l < layers; ++l) {
      auto& K = kbuf[static_cast<std::size_t>(l)];
      auto& V = vbuf[static_cast<std::size_t>(l)];
      kv::PagedCache<bf16>& cache = caches[static_cast<std::size_t>(l)];
      model.rows(l, 1, t, 1, Hkv, K.data() + t * row_elems);
      model.rows(l, 2, t, 1, Hkv, V.data() + t * row_elems);
      model.rows(l, 0, t, 1, Hq, q1.data());
      const auto q = TensorView<const bf16>::token_major(q1.data(), Hq, 1, d);
      const auto o = TensorView<float>(o1.data(), Hq, 1, d);
      const auto t0 = std::chrono::steady_clock::now();
      cache.append(kv_view(K, t + 1).slice_tokens(t, 1), kv_view(V, t + 1).slice_tokens(t, 1));

      quest.select(q, cache, Budget::compression(kQuestCR), opt, sel, &pages);
      // Reuse the plan while the shape and the keys per KV head are those it was made for.
      for (index_t u = 0; u < Hkv; ++u)
        keys[static_cast<std::size_t>(u)] = sel.keys.keys(u, cache.max_length());
      if (keys != planned_keys || sel.keys.scope() != planned_scope ||
          dplan.shape().n_k != cache.max_length()) {
        dplan = plan_decode(attention_shape(q, cache.keys(), cache.values()), sel.keys, dopt);
        planned_keys = keys;
        planned_scope = sel.keys.scope();
        ++decode_plans;
        if (!fits(dplan.workspace_bytes(), "decode")) return 1;
      }
      decode(dplan, q, cache.keys(), cache.values(), o, sel.keys, workspace, dopt);
      decode_ms += ms_since(t0);
      ++decode_calls;
      pairs += sel.stats.pairs;
      dense += sel.stats.dense_pairs;

      // Reference (not part of the engine's loop): dense decoding over the full token-major buffer.
      decode(q, kv_view(K, t + 1), kv_view(V, t + 1), TensorView<float>(ref.data(), Hq, 1, d));
      for (std::size_t i = 0; i < o1.size(); ++i) {
        err += static_cast<double>(o1[i] - ref[i]) * (o1[i] - ref[i]);
        norm += static_cast<double>(ref[i]) * ref[i];
      }
      if (!all_finite(o1)) {
        std::fprintf(stderr, "FAIL: decode output of layer %lld, step %lld is not finite\n",
                     static_cast<long long>(l), static_cast<long long>(s));
        ok = false;
      }
    }
    std::printf(
        "decode step %3lld: %6.0f keys/query of %lld in the sequence, CR %5.2f "
        "(snapkv x quest), quest %s, rel L2 err vs dense %.3f, %lld plan(s) for %lld layers\n",
        static_cast<long long>(s), static_cast<double>(pairs) / static_cast<double>(Hq * layers),
        static_cast<long long>(t + 1), compression_ratio(dense, pairs), sel.stats.detail.c_str(),
        std::sqrt(err / norm), static_cast<long long>(decode_plans - plans_before),
        static_cast<long long>(layers));
  }
  std::printf(
      "prefill %.0f ms (select + plan + kernel), decode %.2f ms per layer and step "
      "(append + select + plan + kernel)\n",
      prefill_ms, decode_ms / static_cast<double>(decode_calls));
  std::printf(
      "workspace: one allocation of %.1f MiB served %lld prefill and %lld decode calls "
      "(%lld decode plans)\n",
      static_cast<double>(workspace.bytes()) / (1 << 20), static_cast<long long>(prefill_calls),
      static_cast<long long>(decode_calls), static_cast<long long>(decode_plans));
  std::printf("%s\n", ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
