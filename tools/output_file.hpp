// The output files of the `sparse-attn` tool (--out, --lse, --json, --plot, frontier's
// frontier.json / frontier.png): where each one goes, what is refused, and the all-or-nothing
// commit. docs/ROBUSTNESS.md, section "The tool's output files" states the rules:
//   - a new path is created; an existing regular file is replaced (its permission bits kept);
//   - a symbolic link is written through: the temp file is made next to the link's final target
//     and renamed onto it, so the link stays a link; a dangling link's target is created (as
//     the shell's `>` and numpy.save do), in its directory, which must exist;
//   - anything else that exists (directory, FIFO, character or block device, socket) is refused
//     (sparse_attn::invalid_argument: exit 2) and never opened, before any computation;
//   - each output is written to "<target>.tmp.<pid>" and all of a run's outputs are renamed into
//     place together at the end (commit); a run that fails before or during the commit leaves no
//     temp file and every pre-existing output as it was.
#pragma once
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstdio>
#include <filesystem>
#include <string>
#include <system_error>
#include <vector>

#include "check.hpp"
#include "sparse_attn/core/error.hpp"
#include "sparse_attn/io/npy.hpp"

namespace sparse_attn::cli {

namespace detail_out {

inline std::string errno_str(int err) { return std::generic_category().message(err); }

/// "a FIFO (named pipe)", ... for a file type that is not written.
inline const char* kind_of(mode_t m) {
  if (S_ISDIR(m)) return "a directory";
  if (S_ISFIFO(m)) return "a FIFO (named pipe)";
  if (S_ISCHR(m)) return "a character device";
  if (S_ISBLK(m)) return "a block device";
  if (S_ISSOCK(m)) return "a socket";
  return "not a regular file";
}

inline std::string pid_suffix() { return std::to_string(static_cast<long>(::getpid())); }

inline void remove_quietly(const std::string& p) {
  if (!p.empty()) ::unlink(p.c_str());
}

/// Creates `path` as a new, empty file (never follows or reuses what is there: a stale file of
/// that name, e.g. left by a killed run with the same pid, is removed first).
inline void create_exclusive(const std::string& path, const std::string& what, bool keep_mode,
                             mode_t mode) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
  if (fd < 0 && errno == EEXIST) {
    ::unlink(path.c_str());
    fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
  }
  if (fd < 0) {
    const int err = errno;
    check(false, what, ": cannot create the temporary file ", path, ": ", errno_str(err));
  }
  if (keep_mode) (void)::fchmod(fd, mode);  // the replaced file's permission bits
  ::close(fd);
}

/// Writes `text` to the existing file `path` (created by create_exclusive).
inline void write_text(const std::string& path, const std::string& text, const std::string& what) {
  errno = 0;
  io::detail::FilePtr f(std::fopen(path.c_str(), "wb"));
  if (!f) {
    const int err = errno;
    check(false, what, ": cannot open ", path, ": ", errno_str(err));
  }
  io::detail::write_all(f.get(), text.data(), text.size(), what);
  std::FILE* raw = f.release();
  if (std::fclose(raw) != 0) {
    const int err = errno;
    check(false, what, ": write failed on close (", path, "): ", errno_str(err));
  }
}

}  // namespace detail_out

/// Where one output path option's data goes.
struct OutputTarget {
  std::string option;   // "--out", "--json", ...
  std::string path;     // as given
  std::string dest;     // the file replaced or created: path, or the final target of its links
  bool link = false;    // path is a symbolic link (written through)
  bool exists = false;  // dest is an existing regular file
  mode_t mode = 0;      // its permission bits (kept)
  std::string what() const { return option + " " + path; }
};

/// Resolves `path` (given as `option`) and checks it can be written: follows symbolic links to
/// their final target (relative targets relative to the link's directory); refuses an existing
/// file that is not a regular file, naming its kind; requires the target's directory to exist.
/// Only lstat/stat/readlink/access: nothing is opened, so a FIFO is never blocked on.
inline OutputTarget resolve_output(const std::string& path, const std::string& option) {
  namespace fs = std::filesystem;
  OutputTarget t;
  t.option = option;
  t.path = path;
  check(!path.empty(), option, ": empty path; give a file name");
  const char* rule = "; only regular files or new paths are written (it was left untouched)";
  std::string via;  // " (a symbolic link to <target>)" once a link was followed
  fs::path cur = path;
  for (int hops = 0;; ++hops) {
    struct stat st {};
    if (::lstat(cur.c_str(), &st) != 0) {
      const int err = errno;
      // ENOENT: a new file; ENOTDIR: a parent is not a directory (reported below).
      if (err == ENOENT || err == ENOTDIR) break;
      check(false, t.what(), via, ": cannot be examined: ", detail_out::errno_str(err));
    }
    if (S_ISLNK(st.st_mode)) {
      check(hops < 40, t.what(), ": too many levels of symbolic links");
      std::string target(static_cast<std::size_t>(st.st_size > 0 ? st.st_size : 255) + 1, '\0');
      const ssize_t n = ::readlink(cur.c_str(), target.data(), target.size());
      if (n < 0) {
        const int err = errno;
        check(false, t.what(), ": cannot read the symbolic link ", cur.string(), ": ",
              detail_out::errno_str(err));
      }
      target.resize(static_cast<std::size_t>(n));
      const fs::path next = fs::path(target).is_absolute() ? fs::path(target)
                                                           : cur.parent_path() / target;
      cur = next;
      t.link = true;
      via = " (a symbolic link to " + cur.string() + ")";
      continue;
    }
    check(S_ISREG(st.st_mode), t.what(), via, " is ", detail_out::kind_of(st.st_mode), rule);
    t.exists = true;
    t.mode = st.st_mode & 0777;
    break;
  }
  t.dest = cur.string();
  const fs::path parent = cur.parent_path().empty() ? fs::path(".") : cur.parent_path();
  struct stat ps {};
  check(::stat(parent.c_str(), &ps) == 0 && S_ISDIR(ps.st_mode), t.what(), via,
        ": directory does not exist: ", parent.string());
  check(::access(parent.c_str(), W_OK | X_OK) == 0, t.what(), via, ": directory ",
        parent.string(), " is not writable: ", detail_out::errno_str(errno));
  return t;
}

/// A run's output files. add() every output before any computation (it resolves and checks the
/// path, and that no two outputs are one file); stage_*() writes an output to its temp file;
/// commit() renames every staged temp file onto its target, all or nothing. Without commit()
/// (an exception) the destructor removes the temp files: no output changes.
class OutputSet {
 public:
  OutputSet() = default;
  OutputSet(const OutputSet&) = delete;
  OutputSet& operator=(const OutputSet&) = delete;
  ~OutputSet() {
    if (committed_) return;
    for (const Item& it : items_)
      if (it.staged) detail_out::remove_quietly(it.tmp);
  }

  /// Resolves `path` (resolve_output) and returns its index. `tmp_suffix` ends the temp name
  /// (".png": programs that pick the format from the name).
  std::size_t add(const std::string& path, const std::string& option,
                  const std::string& tmp_suffix = "") {
    Item it;
    it.target = resolve_output(path, option);
    it.key = key_of(it.target.dest);
    for (const Item& o : items_)
      check(o.key != it.key, o.target.option, " and ", option, " name the same file ",
            it.target.dest, " (", o.target.path, ", ", path, ")");
    it.tmp = it.target.dest + ".tmp." + detail_out::pid_suffix() + tmp_suffix;
    items_.push_back(std::move(it));
    return items_.size() - 1;
  }

  const OutputTarget& target(std::size_t i) const { return items_.at(i).target; }
  /// Output i's temp file name (<target>.tmp.<pid>[suffix]); it exists once staged.
  const std::string& tmp(std::size_t i) const { return items_.at(i).tmp; }

  /// Creates output i's temp file (empty, with the permission bits of the file it replaces) and
  /// returns its name; the caller (or a program it runs) writes the data there.
  const std::string& create_tmp(std::size_t i) {
    Item& it = items_.at(i);
    detail_out::create_exclusive(it.tmp, it.target.what(), it.target.exists, it.target.mode);
    it.staged = true;
    return it.tmp;
  }

  template <class T>
  void stage_npy(std::size_t i, const T* data, const std::vector<index_t>& shape) {
    const std::string& tmp = create_tmp(i);
    try {
      io::write_npy_direct(tmp, data, shape);
    } catch (const invalid_argument& e) {
      throw invalid_argument(items_[i].target.option + " " + e.what());
    }
  }

  void stage_text(std::size_t i, const std::string& text) {
    detail_out::write_text(create_tmp(i), text, items_.at(i).target.what());
  }

  /// Renames every staged temp file onto its target. First each existing target gets a backup
  /// (a hard link, else a copy) so that a failed rename can put every earlier one back: on any
  /// failure no output has changed and no temp or backup file remains.
  void commit() {
    namespace fs = std::filesystem;
    std::vector<std::string> backups(items_.size());
    auto drop_backups = [&] {
      for (const std::string& b : backups) detail_out::remove_quietly(b);
    };
    try {
      for (std::size_t i = 0; i < items_.size(); ++i) {
        const Item& it = items_[i];
        if (!it.staged || !it.target.exists) continue;
        backups[i] = it.target.dest + ".bak." + detail_out::pid_suffix();
        ::unlink(backups[i].c_str());
        if (::link(it.target.dest.c_str(), backups[i].c_str()) != 0) {
          std::error_code ec;
          if (!fs::copy_file(it.target.dest, backups[i], fs::copy_options::overwrite_existing, ec))
            check(false, it.target.what(), ": cannot keep a backup of ", it.target.dest,
                  " while replacing it (", backups[i], "): ", ec.message(),
                  "; no output was changed");
        }
      }
      for (std::size_t i = 0; i < items_.size(); ++i) {
        Item& it = items_[i];
        if (!it.staged) continue;
        if (std::rename(it.tmp.c_str(), it.target.dest.c_str()) != 0) {
          const int err = errno;
          for (std::size_t j = 0; j < i; ++j) {  // put the earlier outputs back
            if (!items_[j].staged) continue;
            if (!backups[j].empty()) {
              if (std::rename(backups[j].c_str(), items_[j].target.dest.c_str()) == 0)
                backups[j].clear();
            } else {
              detail_out::remove_quietly(items_[j].target.dest);
            }
          }
          check(false, it.target.what(), ": cannot move the finished file into place (",
                it.target.dest, "): ", detail_out::errno_str(err), "; no output was changed");
        }
      }
    } catch (...) {
      drop_backups();
      throw;  // the destructor removes the temp files not renamed
    }
    committed_ = true;
    drop_backups();
  }

 private:
  struct Item {
    OutputTarget target;
    std::string key;  // the target's absolute path, directories' links resolved
    std::string tmp;
    bool staged = false;
  };
  static std::string key_of(const std::string& dest) {
    namespace fs = std::filesystem;
    std::error_code ec;
    fs::path abs = fs::absolute(dest, ec);
    if (ec) abs = dest;
    const fs::path canon = fs::weakly_canonical(abs, ec);
    return (ec ? abs : canon).lexically_normal().string();
  }
  std::vector<Item> items_;
  bool committed_ = false;
};

/// A scratch file next to an output (the plot's script and input), removed when this goes out
/// of scope whatever happens.
class ScratchFile {
 public:
  ScratchFile(std::string path, const std::string& what) : path_(std::move(path)) {
    detail_out::create_exclusive(path_, what, false, 0);
  }
  ScratchFile(const ScratchFile&) = delete;
  ScratchFile& operator=(const ScratchFile&) = delete;
  ~ScratchFile() { detail_out::remove_quietly(path_); }
  void write(const std::string& text, const std::string& what) const {
    detail_out::write_text(path_, text, what);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

/// The help text on output files, shared by the subcommands' footers.
inline constexpr const char* kOutputFilesHelp =
    R"(Output files: each is written to <file>.tmp.<pid> and renamed into place once every output
of the run is complete; a failed run changes no output and leaves no temp file. A symbolic link
is written through: its final target is replaced and the link stays a link (a dangling link's
target is created; its directory must exist). An existing directory, FIFO, device or socket is
refused (exit 2) before anything is computed. A replaced file keeps its permission bits.
)";

}  // namespace sparse_attn::cli
