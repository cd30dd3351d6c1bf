#!/usr/bin/env python3
"""The repository refers to nothing outside itself, and every reference inside it resolves.

Usage: check_doc_links.py <repository root>. Exit 0 when clean; else one line per problem, exit 1.

Rules, over every tracked file (git ls-files; without git, every file outside build trees):
  1. no path that leaves the repository for the team's old internal spec (a parent directory
     named "shared", or its docs folder);
  2. every Markdown link [text](target) of a *.md file with a relative target names an existing
     file or directory, and a #anchor in it names a heading of that Markdown file (GitHub's slug
     rule: lower case, punctuation except '-' and '_' dropped, spaces to '-');
  3. every citation docs/<name>.md names an existing file;
  4. every citation docs/<name>.md, section "<title>" names a heading of that file;
  5. no citation of a guide by a section number ("METHODS.md 10", "DESIGN.md section 3"): the
     guides have titled sections, not numbered ones;
  6. outside Markdown, a guide of docs/ is cited by its path (docs/METHODS.md), not its bare name.
"""
import os
import re
import subprocess
import sys

ROOT = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else ".")
# Built from pieces so that this file does not match its own rule.
OUTSIDE = [re.compile(re.escape("..") + r"/" + "shared"), re.compile("shared" + r"/" + "docs")]
MD_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
DOC_CITE = re.compile(r"\bdocs/([A-Za-z0-9_.\-/]+?\.md)\b")
SECTION_CITE = re.compile(r"\bdocs/([A-Za-z0-9_.\-/]+?\.md),?\s+section\s+\"([^\"]+)\"")
NUMBERED = re.compile(r"\b[A-Z][A-Z_]+\.md,?\s+(?:section\s+)?\d")
SKIP_DIRS = {".git", "build", "node_modules"}


def tracked_files():
    try:
        out = subprocess.run(["git", "-C", ROOT, "ls-files", "-z"], capture_output=True, check=True)
        files = [f for f in out.stdout.decode().split("\0") if f]
        if files:
            return files
    except (OSError, subprocess.CalledProcessError):
        pass
    files = []
    for d, dirs, names in os.walk(ROOT):
        dirs[:] = [x for x in dirs if x not in SKIP_DIRS and not x.startswith("build")]
        for n in names:
            files.append(os.path.relpath(os.path.join(d, n), ROOT))
    return files


def slug(title):
    t = title.strip().lower()
    t = re.sub(r"[^\w\- ]", "", t)
    return t.replace(" ", "-")


_headings = {}


def headings(md_path):
    if md_path not in _headings:
        titles = []
        in_code = False
        try:
            with open(md_path, encoding="utf-8") as f:
                for line in f:
                    if line.lstrip().startswith("```"):
                        in_code = not in_code
                    m = None if in_code else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
                    if m:
                        titles.append(re.sub(r"\s*\{#[^}]*\}$", "", m.group(1)))
        except OSError:
            pass
        _headings[md_path] = titles
    return _headings[md_path]


def main():
    problems = []
    guides = sorted(n[:-3] for n in os.listdir(os.path.join(ROOT, "docs")) if n.endswith(".md"))
    bare = re.compile(r"(?<![\w/])(" + "|".join(map(re.escape, guides)) + r")\.md\b") if guides else None
    for rel in tracked_files():
        path = os.path.join(ROOT, rel)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (UnicodeDecodeError, OSError):
            continue  # binary data (.npy, .png)
        for no, line in enumerate(text.split("\n"), 1):
            where = f"{rel}:{no}"
            for pat in OUTSIDE:
                if pat.search(line):
                    problems.append(f"{where}: refers outside the repository: {line.strip()}")
            for m in DOC_CITE.finditer(line):
                if not os.path.isfile(os.path.join(ROOT, "docs", m.group(1))):
                    problems.append(f"{where}: cites docs/{m.group(1)}, which does not exist")
            for m in SECTION_CITE.finditer(line):
                target = os.path.join(ROOT, "docs", m.group(1))
                if os.path.isfile(target) and m.group(2) not in headings(target):
                    problems.append(f"{where}: docs/{m.group(1)} has no section \"{m.group(2)}\"")
            if NUMBERED.search(line):
                problems.append(f"{where}: cites a guide by section number: {line.strip()}")
            if bare and not rel.endswith(".md"):
                for m in bare.finditer(line):
                    problems.append(f"{where}: cite {m.group(0)} as docs/{m.group(0)}")
            if rel.endswith(".md"):
                for m in MD_LINK.finditer(line):
                    target = m.group(1)
                    if re.match(r"^[a-z]+:", target) or target.startswith("//"):
                        continue  # http(s), mailto: outside by design
                    file_part, _, anchor = target.partition("#")
                    dest = path if not file_part else os.path.normpath(
                        os.path.join(os.path.dirname(path), file_part))
                    if not os.path.exists(dest):
                        problems.append(f"{where}: link target {target} does not exist")
                    elif anchor and dest.endswith(".md"):
                        if anchor not in {slug(h) for h in headings(dest)}:
                            problems.append(f"{where}: {file_part or rel} has no heading #{anchor}")
    for p in problems:
        print(p)
    print(f"check_doc_links: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
