// Calls the two copies of arch_tu.cpp (x86-64-v2 and x86-64-v3) linked into this program. Exits
// 77 (ctest SKIP_RETURN_CODE) on a CPU without x86-64-v3: its copy would die of SIGILL there.
#include <cstdio>

double multi_arch_error_v2();
double multi_arch_error_v3();

int main() {
  __builtin_cpu_init();
  // x86-64-v3's features that both GCC 12 and clang 14 can query (clang 14 knows no level names,
  // nor f16c, lzcnt or movbe; no CPU has AVX2, FMA and BMI2 without those).
  const bool v3 = __builtin_cpu_supports("avx") && __builtin_cpu_supports("avx2") &&
                  __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi") &&
                  __builtin_cpu_supports("bmi2");
  const double tol = 2e-5;  // tests/test_kernels.cpp: storage_tol() and the decode checks
  int failed = 0;
  const double e2 = multi_arch_error_v2();
  std::printf("multi_arch: x86-64-v2 error %.3g (tolerance %.3g)\n", e2, tol);
  failed += !(e2 <= tol);  // NaN fails too
  if (!v3) {
    std::printf("multi_arch: SKIPPED: this CPU lacks x86-64-v3 (AVX2, FMA, BMI2)\n");
    return failed ? 1 : 77;
  }
  const double e3 = multi_arch_error_v3();
  std::printf("multi_arch: x86-64-v3 error %.3g (tolerance %.3g)\n", e3, tol);
  failed += !(e3 <= tol);
  return failed ? 1 : 0;
}
