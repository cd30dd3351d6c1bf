// The generic target: Eigen's packet math for whatever the includer compiles for (SSE on
// x86-64-v2, NEON on aarch64, AVX-512 under -march=native, scalar elsewhere). It is always
// available, and it defines the operation set that every target's Vec provides:
//
//   F, kLanes                   the fp32 packet and its lane count
//   kTileVecs, kTileRows        prefill micro-tile: kTileVecs packets of queries x kTileRows keys
//   zero, set1, load (aligned), loadu, store, storeu, add, sub, mul, fmadd(a, b, c) = a b + c
//   max(a, b)                   a where either is NaN (running maxima ignore NaN logits)
//   zero_if_neg_inf, reduce_add, reduce_max, reduce_min
//   exp(x)                      e^x for x in [-88, 88]; masked_exp(x): also 0 for x <= -87, -inf
//   load_as_float<T>(p)         kLanes elements of float / bf16 / fp16 as fp32 (kWidensHalf says
//                               whether bf16/fp16 packets exist; else only float)
//   hsum16(a, out)              out[i] = sum of the lanes of a[i], i < 16
//
// and optional ones announced by flags: kHasBf16Pairs (load_bf16_pair), kHasRowSoftmax
// (online_softmax_rows), kHasBf16Dot (qk_bf16, pv_bf16_pair, the bf16 pair tiles), kHasAmx (AMX
// tiles for the prefill products, arch/amx/tiles.hpp). This is the only file besides the
// x86 targets that touches Eigen::internal.
#pragma once
#include "sparse_attn/core/config.hpp"
#include <cstdint>
#include <type_traits>

#include "sparse_attn/core/diagnostics.hpp"
#include "sparse_attn/core/dtype.hpp"

SPARSE_ATTN_DIAGNOSTICS_PUSH
SPARSE_ATTN_NAMESPACE_BEGIN
namespace arch::generic {

struct Vec {
  using F = Eigen::internal::packet_traits<float>::type;
  static constexpr int kLanes = static_cast<int>(sizeof(F) / sizeof(float));
  static constexpr int kTileVecs = kLanes >= 16 ? 4 : 2;
  static constexpr int kTileRows = 6;
  static constexpr bool kWidensHalf = false;
  static constexpr bool kHasBf16Pairs = false;
  static constexpr bool kHasRowSoftmax = false;
  static constexpr bool kHasBf16Dot = false;
  static constexpr bool kHasAmx = false;

  static F zero() { return Eigen::internal::pset1<F>(0.0f); }
  static F set1(float x) { return Eigen::internal::pset1<F>(x); }
  static F load(const float* p) { return Eigen::internal::pload<F>(p); }
  static F loadu(const float* p) { return Eigen::internal::ploadu<F>(p); }
  static void store(float* p, F x) { Eigen::internal::pstore(p, x); }
  static void storeu(float* p, F x) { Eigen::internal::pstoreu(p, x); }
  static F add(F a, F b) { return Eigen::internal::padd(a, b); }
  static F sub(F a, F b) { return Eigen::internal::psub(a, b); }
  static F mul(F a, F b) { return Eigen::internal::pmul(a, b); }
  static F fmadd(F a, F b, F c) { return Eigen::internal::pmadd(a, b, c); }
  static F max(F a, F b) { return Eigen::internal::pmax(a, b); }
  static F zero_if_neg_inf(F x) {
    using namespace Eigen::internal;
    return pselect(pcmp_eq(x, pset1<F>(-INFINITY)), pset1<F>(0.0f), x);
  }
  static float reduce_add(F x) { return Eigen::internal::predux(x); }
  static float reduce_max(F x) { return Eigen::internal::predux_max(x); }
  static float reduce_min(F x) { return Eigen::internal::predux_min(x); }
  static F exp(F x) { return Eigen::internal::pexp(x); }
  static F masked_exp(F x) {
    using namespace Eigen::internal;
    const F lo = pset1<F>(-87.0f);
    return pandnot(pexp(pmax(x, lo)), pcmp_le(x, lo));  // pmax(NaN, lo) = NaN; NaN <= lo: false
  }
  template <class T>
  static F load_as_float(const T* p) {
    static_assert(std::is_same_v<T, float>, "the generic target widens bf16/fp16 rows itself");
    return Eigen::internal::ploadu<F>(p);
  }
  static void hsum16(const F* a, float* out) {
    for (int i = 0; i < 16; ++i) out[i] = Eigen::internal::predux(a[i]);
  }
};

}  // namespace arch::generic
SPARSE_ATTN_NAMESPACE_END
SPARSE_ATTN_DIAGNOSTICS_POP
