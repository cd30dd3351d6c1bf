// `sparse-attn`: run the library's kernels on .npy files. See `sparse-attn --help`.
#include <cstdio>
#include <exception>
#include <new>
#include <string>
#include <vector>

#include "cli.hpp"

namespace {

// Exactly one line on stderr, whatever the message holds.
int report(int code, const std::string& msg) {
  std::string line = msg;
  for (char& c : line)
    if (c == '\n' || c == '\r') c = ' ';
  std::fprintf(stderr, "sparse-attn: error: %s\n", line.c_str());
  return code;
}

}  // namespace

namespace sparse_attn::cli {
Command add_eval_command(CLI::App& root);      // cmd_eval.cpp
Command add_frontier_command(CLI::App& root);  // cmd_frontier.cpp
}  // namespace sparse_attn::cli

int main(int argc, char** argv) {
  using namespace sparse_attn::cli;
  CLI::App app{"sparse-attn: CPU sparse attention kernels on .npy tensors", "sparse-attn"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "sparse-attn 0.1.0");

  std::vector<Command> commands;
  commands.push_back(add_attend_command(app));
  commands.push_back(add_decode_command(app));
  commands.push_back(add_eval_command(app));
  commands.push_back(add_frontier_command(app));

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    return report(kExitBadInput, std::string(e.what()) + " (run 'sparse-attn --help')");
  }

  try {
    for (const Command& c : commands)
      if (c.app->parsed()) c.run();
  } catch (const sparse_attn::invalid_argument& e) {
    return report(kExitBadInput, e.what());
  } catch (const std::bad_alloc&) {
    return report(kExitInternal, "out of memory");
  } catch (const std::exception& e) {
    return report(kExitInternal, e.what());
  }
  return kExitOk;
}
