// Built with -fno-exceptions: every error of the library takes the error handler's path.
// `no_exceptions handler`: a caller-set handler receives the message (it ends the process itself).
// `no_exceptions default`: the default handler prints "sparse_attn: <message>" and aborts.
// ctest checks the printed lines; "UNREACHABLE" would mean an error returned to the caller.
#include <sparse_attn/sparse_attn.hpp>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {
void exit_handler(const char* message) {
  std::printf("handled: %s\n", message);
  std::fflush(stdout);
  std::_Exit(3);
}
}  // namespace

int main(int argc, char** argv) {
  using namespace sparse_attn;
  if (argc > 1 && std::strcmp(argv[1], "handler") == 0) set_error_handler(&exit_handler);
  std::vector<float> q(3 * 8 * 16), kv(2 * 8 * 16), out(q.size());
  const TensorView<const float> qv(q.data(), 3, 8, 16), k(kv.data(), 2, 8, 16);
  prefill(qv, k, k, TensorView<float>(out.data(), 3, 8, 16), masks::causal(3, 8, 8));  // Hq % Hkv != 0
  std::printf("UNREACHABLE\n");
  return 0;
}
