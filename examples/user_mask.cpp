// user_mask: the engine's own attention pattern as a block mask. Here, a packed batch: several
// documents (prompts of different requests) concatenated into one sequence, as engines pack
// prefills, where a token attends only to earlier tokens of its own document.
//
// The engine describes the pattern in block CSR, the layout of FlexAttention's BlockMask: per
// query block, the key blocks it needs, each flagged full (every pair computed, no element test)
// or partial (an element predicate decides; here "same document", over the engine's own array of
// document ids). methods::BasicUserMask validates the arrays and holds the mask; the common prefill
// kernel runs it. Prints the achieved compression: dense causal attention over the whole packed
// sequence / the pairs computed. Checks (exit 1 on failure): the mask allows exactly the
// same-document causal pairs and none across documents, and each document's output equals
// dense causal attention over that document alone (fp32 rounding).
//
// Usage: user_mask [tokens]   (default 16384)
#include <sparse_attn/sparse_attn.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

using namespace sparse_attn;

namespace {

// The element test of partial blocks: query qi (position qi + q_offset) and key kj in one document.
struct SameDocument {
  const std::int32_t* doc = nullptr;  // document id of every position: the engine's array
  index_t q_offset = 0;
  bool operator()(index_t /*head*/, index_t qi, index_t kj) const noexcept {
    return doc[qi + q_offset] == doc[kj];
  }
};

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main(int argc, char** argv) {
  const index_t n = argc > 1 ? std::atoll(argv[1]) : 16384, Hq = 8, Hkv = 2, d = 64, block = 64;
  if (n < 1) {
    std::fprintf(stderr, "usage: user_mask [tokens]\n");
    return 2;
  }

  // The packed batch: documents of random lengths; doc[t] = the document of position t.
  std::mt19937 rng(3);
  std::vector<index_t> starts;  // first position of each document, then n
  for (index_t t = 0; t < n;) {
    starts.push_back(t);
    t += std::uniform_int_distribution<index_t>(std::max<index_t>(1, n / 32),
                                                std::max<index_t>(1, n / 4))(rng);
  }
  starts.push_back(n);
  const index_t docs = static_cast<index_t>(starts.size()) - 1;
  std::vector<std::int32_t> doc(static_cast<std::size_t>(n));
  for (index_t i = 0; i < docs; ++i)
    std::fill(doc.begin() + starts[i], doc.begin() + starts[i + 1], static_cast<std::int32_t>(i));

  // The engine's block CSR (one layout for every head): query block qb needs the key blocks from
  // the start of the document of its first query up to its last query (causal). A block is full
  // when its queries and keys all lie in one document; the mask itself also marks the blocks the
  // diagonal cuts as partial.
  const MaskShape shape{Hq, n, n, block, block, /*causal*/ true};
  std::vector<index_t> row_offsets{0};
  std::vector<std::int32_t> col_indices;
  std::vector<std::uint8_t> full;
  for (index_t qb = 0; qb < shape.num_q_blocks(); ++qb) {
    const index_t q0 = shape.q_begin(qb), q1 = shape.q_end(qb);
    const bool one_doc = doc[q0] == doc[q1 - 1];
    for (index_t kb = starts[doc[q0]] / block; kb <= (q1 - 1) / block; ++kb) {
      const index_t k0 = shape.k_begin(kb), k1 = shape.k_end(kb);
      col_indices.push_back(static_cast<std::int32_t>(kb));
      full.push_back(one_doc && doc[k0] == doc[q0] && doc[k1 - 1] == doc[q0] ? 1 : 0);
    }
    row_offsets.push_back(static_cast<index_t>(col_indices.size()));
  }
  const methods::BasicUserMask<SameDocument> user(shape, /*head_shared*/ true, row_offsets,
                                                  col_indices, full,
                                                  SameDocument{doc.data(), shape.q_offset()});
  const auto& mask = user.mask;

  // Q, K, V of the packed sequence, [heads][tokens][d] fp32.
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> qs(static_cast<std::size_t>(Hq * n * d)),
      ks(static_cast<std::size_t>(Hkv * n * d)), vs(ks.size());
  for (auto* x : {&qs, &ks, &vs})
    for (float& e : *x) e = normal(rng);
  const TensorView<const float> q(qs.data(), Hq, n, d), k(ks.data(), Hkv, n, d),
      v(vs.data(), Hkv, n, d);
  std::vector<float> out(qs.size()), dense(qs.size());
  auto t0 = std::chrono::steady_clock::now();
  prefill(q, k, v, TensorView<float>(out.data(), Hq, n, d), mask);
  const double mask_ms = ms_since(t0);
  t0 = std::chrono::steady_clock::now();
  prefill(q, k, v, TensorView<float>(dense.data(), Hq, n, d),
          masks::causal(Hq, n, n));  // for the timing only
  const double dense_ms = ms_since(t0);

  // Check 1: the allowed pairs are exactly the same-document causal pairs (walk every listed
  // block).
  index_t expected = 0, across = 0;
  for (index_t i = 0; i < docs; ++i) {
    const index_t len = starts[i + 1] - starts[i];
    expected += Hq * len * (len + 1) / 2;
  }
  for (index_t qb = 0; qb < shape.num_q_blocks(); ++qb)
    mask.for_each_block(0, qb, [&](index_t kb, bool is_full) {
      for (index_t i = shape.q_begin(qb); i < shape.q_end(qb); ++i)
        for (index_t j = shape.k_begin(kb); j < shape.k_end(kb); ++j)
          if ((is_full || mask.allowed_in_block(0, i, j)) && doc[i] != doc[j]) ++across;
    });
  // Check 2: every document's rows equal dense causal attention over that document alone.
  float diff = 0, scale = 0;
  for (index_t i = 0; i < docs; ++i) {
    const index_t b = starts[i], len = starts[i + 1] - b;
    std::vector<float> ref(static_cast<std::size_t>(Hq * len * d));
    prefill(q.slice_tokens(b, len), k.slice_tokens(b, len), v.slice_tokens(b, len),
            TensorView<float>(ref.data(), Hq, len, d), masks::causal(Hq, len, len));
    for (index_t h = 0; h < Hq; ++h)
      for (index_t t = 0; t < len; ++t)
        for (index_t c = 0; c < d; ++c) {
          const float r = ref[static_cast<std::size_t>((h * len + t) * d + c)];
          diff =
              std::max(diff, std::abs(out[static_cast<std::size_t>((h * n + b + t) * d + c)] - r));
          scale = std::max(scale, std::abs(r));
        }
  }

  index_t full_blocks = 0;
  for (std::uint8_t f : mask.full_flags()) full_blocks += f;
  std::printf("packed batch: %lld documents in %lld tokens (Hq=%lld Hkv=%lld d=%lld fp32), lengths",
              static_cast<long long>(docs), static_cast<long long>(n), static_cast<long long>(Hq),
              static_cast<long long>(Hkv), static_cast<long long>(d));
  for (index_t i = 0; i < docs; ++i)
    std::printf(" %lld", static_cast<long long>(starts[i + 1] - starts[i]));
  std::printf(
      "\nuser mask: %zu listed blocks of %lldx%lld (%lld full, %lld partial), %lld pairs, "
      "CR %.2f vs dense causal over the packed sequence\n",
      mask.block_indices().size(), static_cast<long long>(block), static_cast<long long>(block),
      static_cast<long long>(full_blocks),
      static_cast<long long>(mask.block_indices().size()) - static_cast<long long>(full_blocks),
      static_cast<long long>(mask.pairs()), mask.compression());
  std::printf("prefill: %.1f ms with the mask, %.1f ms dense causal over the packed sequence\n",
              mask_ms, dense_ms);
  const float tol = 1e-5f * std::max(1.0f, scale);
  const bool ok = mask.pairs() == expected && across == 0 && diff <= tol;
  std::printf(
      "checks: pairs = same-document causal pairs (%lld): %s; pairs across documents: %lld; "
      "max |O - dense per document| %.2e (tolerance %.0e)\n",
      static_cast<long long>(expected), mask.pairs() == expected ? "yes" : "NO",
      static_cast<long long>(across), static_cast<double>(diff), static_cast<double>(tol));
  std::printf("%s\n", ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
