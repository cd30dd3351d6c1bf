#!/usr/bin/env python3
"""ctest readme_commands: README.md's shell commands run, its synopses match --help, its links resolve.

Conventions of README.md this test enforces:
  - ```bash blocks are commands to run. The two set-up blocks (they contain `apt-get`) are not run
    here (they install packages as root); set-up (b) must equal the command .ci/run runs.
  - ```text blocks starting with `sparse-attn <subcommand>` are synopses: not run, but their
    options must be exactly the options `sparse-attn <subcommand> --help` lists, for each of
    attend, decode, eval and frontier.
  (Its links and anchors are checked by the docs_links test, tests/check_doc_links.py.)

How the bash blocks run: each block is one bash script (set -euo pipefail) in a fresh temporary
directory holding a link `data` to the repository's data/ (commands write their outputs there),
after these rewrites:
  ./build/tools/sparse-attn      -> this script in --wrap mode around the built tool, which runs
                                    it and then checks: exit status 0; attend/decode print exactly
                                    one JSON line; files named by --out/--lse/--json exist, and
                                    --json files parse as JSON. `frontier` gets the reduced
                                    workload (--synthetic-tokens 1024 --compression 2
                                    --real-compression 2) appended, and --no-plot when python3
                                    with matplotlib is missing;
  ./build/examples/<name>        -> the built example <name> (missing: the test fails; no examples
                                    build at all: the block is skipped and says so);
  cmake -S .                     -> cmake -S <source dir>;  /opt/sparse_attn -> <tmp>/prefix.
"""
import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

SUBCOMMANDS = ("attend", "decode", "eval", "frontier")
FRONTIER_REDUCED = ["--synthetic-tokens", "1024", "--compression", "2", "--real-compression", "2"]
OPTION_RE = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")


def fenced_blocks(text):
    """(language, body, first line number) of every ``` fenced block."""
    blocks, lang, body, start = [], None, [], 0
    for no, line in enumerate(text.splitlines(), 1):
        m = re.match(r"^```(\w*)\s*$", line)
        if m and lang is None:
            lang, body, start = m.group(1) or "none", [], no + 1
        elif line.startswith("```") and lang is not None:
            blocks.append((lang, "\n".join(body), start))
            lang = None
        elif lang is not None:
            body.append(line)
    if lang is not None:
        raise SystemExit(f"README.md:{start}: unterminated ``` block")
    return blocks


def help_options(tool, sub):
    """The long options `tool sub --help` lists in its OPTIONS section (footer excluded)."""
    r = subprocess.run([tool, sub, "--help"], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise SystemExit(f"{tool} {sub} --help exited {r.returncode}: {r.stderr}")
    opts, in_options = set(), False
    for line in r.stdout.splitlines():
        if re.match(r"^\s*OPTIONS:\s*$", line, re.I) or re.match(r"^Options:\s*$", line):
            in_options = True
            continue
        if in_options:
            if not line.strip():
                continue
            if not line.startswith(" "):  # the footer (or another section) starts
                break
            first = line.split(None, 1)[0] if line.strip().startswith("-") else ""
            # An option line: "  -h,--help   text" or "  --causal{false},--no-causal  text".
            if first.startswith("-"):
                for name in re.split(r",", first):
                    name = re.sub(r"\{.*?\}", "", name)
                    if name.startswith("--"):
                        opts.add(name)
    if not opts:
        raise SystemExit(f"{tool} {sub} --help: found no OPTIONS section:\n{r.stdout}")
    return opts


def check_synopses(readme, tool, failures):
    found = {}
    for lang, body, line in fenced_blocks(readme):
        if lang != "text":
            continue
        m = re.match(r"\s*sparse-attn\s+(\w+)", body)
        if not m:
            continue
        sub = m.group(1)
        if sub in found:
            failures.append(f"README.md:{line}: a second synopsis of `sparse-attn {sub}`")
        found[sub] = (set(OPTION_RE.findall(body)), line)
    for sub in SUBCOMMANDS:
        if sub not in found:
            failures.append(f"README.md: no ```text synopsis block for `sparse-attn {sub}`")
            continue
        readme_opts, line = found[sub]
        want = help_options(tool, sub)
        missing, extra = sorted(want - readme_opts), sorted(readme_opts - want)
        if missing:
            failures.append(f"README.md:{line}: synopsis of `{sub}` lacks {', '.join(missing)} "
                            f"(listed by `sparse-attn {sub} --help`)")
        if extra:
            failures.append(f"README.md:{line}: synopsis of `{sub}` has {', '.join(extra)}, "
                            f"which `sparse-attn {sub} --help` does not list")
        print(f"synopsis {sub}: {len(want)} options, README and --help agree"
              if not missing and not extra else f"synopsis {sub}: MISMATCH")


def check_setup(readme, source_dir, failures):
    setup = [b for lang, b, _ in fenced_blocks(readme) if lang == "bash" and "apt-get" in b]
    if len(setup) != 2:
        failures.append(f"README.md: expected exactly 2 set-up blocks (apt-get), found {len(setup)}")
        return
    with open(os.path.join(source_dir, ".ci", "run"), encoding="utf-8") as f:
        ci = [l for l in f.read().splitlines() if l.startswith("apt-get")]
    if ci != [setup[1].strip()]:
        failures.append("README.md set-up (b) differs from the command .ci/run runs")


def rewrite(block, args, tmp):
    me = [sys.executable, os.path.abspath(__file__), "--wrap", args.tool, "--"]
    s = block.replace("./build/tools/sparse-attn", " ".join(shlex.quote(x) for x in me))
    names = re.findall(r"\./build/examples/([\w.-]+)", s)
    if names and not args.examples_dir:
        raise LookupError(", ".join(names))
    missing = [n for n in names if not os.path.isfile(os.path.join(args.examples_dir, n))]
    if missing:
        raise FileNotFoundError(
            "no such example was built in " + args.examples_dir + ": " + ", ".join(missing) +
            " (is its target missing from examples/CMakeLists.txt?)")
    s = re.sub(r"\./build/examples/([\w.-]+)",
               lambda m: shlex.quote(os.path.join(args.examples_dir, m.group(1))), s)
    s = re.sub(r"\bcmake -S \.(?=\s)", "cmake -S " + shlex.quote(args.source_dir), s)
    s = s.replace("/opt/sparse_attn", shlex.quote(os.path.join(tmp, "prefix")))
    return s


def run_blocks(readme, args, failures):
    blocks = [(b, line) for lang, b, line in fenced_blocks(readme)
              if lang == "bash" and "apt-get" not in b]
    if not blocks:
        failures.append("README.md has no runnable ```bash block")
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(args.cmake) + os.pathsep + env.get("PATH", "")
    for block, line in blocks:
        tmp = tempfile.mkdtemp(prefix="readme_cmd_", dir=args.work_dir)
        os.symlink(os.path.join(args.source_dir, "data"), os.path.join(tmp, "data"))
        try:
            script = rewrite(block, args, tmp)
        except LookupError as e:
            print(f"README.md:{line}: SKIPPED (SPARSE_ATTN_BUILD_EXAMPLES is off: {e})")
            shutil.rmtree(tmp, ignore_errors=True)
            continue
        except FileNotFoundError as e:
            failures.append(f"README.md:{line}: {e}")
            continue
        t0 = time.monotonic()
        r = subprocess.run(["bash", "-c", "set -euo pipefail\n" + script], cwd=tmp, env=env,
                           capture_output=True, text=True)
        dt = time.monotonic() - t0
        first = block.strip().splitlines()[0]
        if r.returncode != 0:
            failures.append(f"README.md:{line}: exit {r.returncode}: {first}\n--- stdout\n"
                            f"{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}")
            print(f"README.md:{line}: FAILED ({dt:.1f} s, outputs kept in {tmp}): {first}")
            continue
        if "cmake --install" in block:
            hdr = os.path.join(tmp, "prefix", "include", "sparse_attn", "sparse_attn.hpp")
            if not os.path.isfile(hdr):
                failures.append(f"README.md:{line}: the install put no {hdr}")
        print(f"README.md:{line}: ok ({dt:.1f} s): {first}")
        shutil.rmtree(tmp, ignore_errors=True)


def has_matplotlib():
    for py in (os.environ.get("SPARSE_ATTN_PYTHON"), "python3", "/usr/bin/python3"):
        if py and shutil.which(py):
            return subprocess.run([py, "-c", "import matplotlib"], capture_output=True).returncode == 0
    return False


def wrap(tool, argv):
    """Runs the tool with argv (as README wrote it), then checks its outputs; returns the exit."""
    sub = argv[0] if argv else ""
    argv = list(argv)
    if sub == "frontier" and "--help" not in argv:
        for flag, value in zip(FRONTIER_REDUCED[::2], FRONTIER_REDUCED[1::2]):
            if flag not in argv:
                argv += [flag, value]
        if "--no-plot" not in argv and not has_matplotlib():
            argv.append("--no-plot")
    r = subprocess.run([tool] + argv, stdout=subprocess.PIPE)
    sys.stdout.buffer.write(r.stdout)
    sys.stdout.flush()
    if r.returncode != 0:
        print(f"readme_commands: sparse-attn {' '.join(argv)}: exit {r.returncode}", file=sys.stderr)
        return r.returncode
    if "--help" in argv or "-h" in argv:
        return 0
    bad = []
    if sub in ("attend", "decode"):
        lines = r.stdout.decode().splitlines()
        if len(lines) != 1:
            bad.append(f"printed {len(lines)} lines, expected one JSON line")
        else:
            try:
                json.loads(lines[0])
            except ValueError as e:
                bad.append(f"stdout is not JSON: {e}")
    for flag in ("--out", "--lse", "--json"):
        if flag in argv:
            path = argv[argv.index(flag) + 1]
            if not os.path.isfile(path):
                bad.append(f"{flag} {path} was not written")
            elif flag == "--json":
                try:
                    with open(path, encoding="utf-8") as f:
                        json.load(f)
                except ValueError as e:
                    bad.append(f"{flag} {path} is not JSON: {e}")
    for b in bad:
        print(f"readme_commands: sparse-attn {' '.join(argv)}: {b}", file=sys.stderr)
    return 1 if bad else 0


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--wrap":
        return wrap(sys.argv[2], sys.argv[4:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source-dir", required=True)
    p.add_argument("--tool", required=True, help="the built sparse-attn")
    p.add_argument("--examples-dir", default="", help="where the examples were built ('' = not built)")
    p.add_argument("--cmake", default=shutil.which("cmake") or "cmake")
    p.add_argument("--work-dir", required=True)
    args = p.parse_args()
    args.source_dir = os.path.abspath(args.source_dir)
    args.tool = os.path.abspath(args.tool)
    os.makedirs(args.work_dir, exist_ok=True)
    with open(os.path.join(args.source_dir, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    failures = []
    check_setup(readme, args.source_dir, failures)
    check_synopses(readme, args.tool, failures)
    run_blocks(readme, args, failures)
    for f in failures:
        print("FAIL: " + f)
    print(f"readme_commands: {'FAILED' if failures else 'passed'} ({len(failures)} failure(s))")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
