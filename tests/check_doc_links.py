#!/usr/bin/env python3
"""The repository stands alone: no file refers to anything outside it, and every reference to a
document inside it resolves. The ctest `docs_links` runs this script; it exits 1 and prints one
line per problem (path:line: what) when any of these rules fails, else prints a summary and exits 0.

  1. No tracked file mentions the parent checkout's shared folder (the two path fragments are
     built at run time below, so this file does not match itself).
  2. Every Markdown link or image [text](target) in a *.md file whose target is relative (not
     http:, https:, mailto: or another URL scheme) points at an existing file or folder, and a
     fragment (X.md#anchor, or #anchor alone) names a heading of that file under GitHub's anchor
     rules (lower case, punctuation dropped, spaces to hyphens, -1, -2 ... for repeats).
     Fenced code blocks and inline code spans are not searched.
  3. Every file that cites docs/NAME.md (in a comment, a string or a document) names a file that
     exists under docs/.
  4. Every citation of the form   docs/NAME.md, section "TITLE"   names a heading of that file
     whose text is exactly TITLE (inline-code backticks ignored). A citation may wrap across
     comment lines: line breaks with their comment markers (//, ///, #, *) count as one space.

  5. No citation of a numbered section ("<GUIDE>.md 10", "<GUIDE>.md section 3"): the documents
     have titled sections, not numbered ones.
  6. Outside Markdown, a guide of docs/ is cited by its path (docs/<GUIDE>.md), never by its bare
     file name, so that rule 3 can check it.

Files: `git ls-files` of the repository (plus untracked files git does not ignore); outside a git
checkout, every file under the root except .git and build folders (folders named build* or holding
a CMakeCache.txt). Binary files (a NUL byte in the first 8 KiB) are skipped.

Usage: check_doc_links.py [REPO_ROOT]   (default: the parent of this script's folder)
"""
import os
import re
import subprocess
import sys
import unicodedata
from urllib.parse import unquote

SELF = os.path.abspath(__file__)

# Rule 1's fragments, assembled so that this file never contains them literally.
FORBIDDEN = [".." + "/" + "shared", "shared" + "/" + "docs"]

CITE_DOC = re.compile(r"(?<![\w./-])docs/([\w][\w.-]*?)\.md\b")
# Between the tokens of a section citation: spaces and, across a line break, comment markers.
_GAP = r"(?:\s|//+|#+|\*+)*"
CITE_SECTION = re.compile(r"(?<![\w./-])docs/([\w][\w.-]*?)\.md," + _GAP + r"section" + _GAP +
                          r"\"([^\"]{1,200})\"")
NUMBERED = re.compile(r"\b(METHODS|DESIGN)\.md(?:,? (?:section|§) ?| )\d+")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
FENCE = re.compile(r"^\s{0,3}(```+|~~~+)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def list_files(root):
    try:
        out = subprocess.run(["git", "-C", root, "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], check=True, capture_output=True).stdout
        files = [f for f in out.decode("utf-8", "surrogateescape").split("\0") if f]
        return sorted({f for f in files if os.path.isfile(os.path.join(root, f))})
    except (OSError, subprocess.CalledProcessError):
        pass
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames
            if d != ".git" and not d.startswith("build")
            and not os.path.exists(os.path.join(dirpath, d, "CMakeCache.txt")))
        for f in filenames:
            files.append(os.path.relpath(os.path.join(dirpath, f), root))
    return sorted(files)


def read_text(path):
    with open(path, "rb") as f:
        data = f.read()
    if b"\0" in data[:8192]:
        return None
    return data.decode("utf-8", "replace")


def strip_code(lines):
    """Lines of a Markdown file with fenced blocks blanked and inline code spans removed."""
    out, fence = [], None
    for line in lines:
        m = FENCE.match(line)
        if fence:
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence):
                fence = None
            out.append("")
            continue
        if m:
            fence = m.group(1)
            out.append("")
            continue
        out.append(re.sub(r"(`+)(?:(?!\1).)+?\1", "", line))
    return out


def headings(text):
    """Heading texts of a Markdown document, in order (fenced code blocks skipped)."""
    result, fence = [], None
    for line in text.splitlines():
        m = FENCE.match(line)
        if fence:
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence):
                fence = None
            continue
        if m:
            fence = m.group(1)
            continue
        h = HEADING.match(line)
        if h:
            result.append(h.group(2))
    return result


def plain(heading):
    """A heading as rendered text: links reduced to their text, code backticks dropped."""
    t = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    return t.replace("`", "")


def slug(heading):
    """GitHub's anchor of a heading (github-slugger): lower case, punctuation removed except
    '-' and '_', each space a hyphen."""
    t = plain(heading).lower()
    kept = []
    for ch in t:
        if ch in "-_ ":
            kept.append("-" if ch == " " else ch)
        elif unicodedata.category(ch)[0] in "LNM":
            kept.append(ch)
    return "".join(kept)


def anchors(text):
    seen, result = {}, set()
    for h in headings(text):
        s = slug(h)
        n = seen.get(s, 0)
        seen[s] = n + 1
        result.add(s if n == 0 else "%s-%d" % (s, n))
    return result


def line_of(text, pos):
    return text.count("\n", 0, pos) + 1


def main():
    root = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else
                           os.path.join(os.path.dirname(SELF), ".."))
    problems, warnings = [], []
    guides = sorted(n[:-3] for n in os.listdir(os.path.join(root, "docs")) if n.endswith(".md")) \
        if os.path.isdir(os.path.join(root, "docs")) else []
    bare = re.compile(r"(?<![\w/.-])(" + "|".join(map(re.escape, guides)) + r")\.md\b") \
        if guides else None
    texts = {}
    for rel in list_files(root):
        path = os.path.join(root, rel)
        if os.path.abspath(path) == SELF:
            continue
        try:
            text = read_text(path)
        except OSError as e:
            problems.append("%s: cannot read (%s)" % (rel, e))
            continue
        if text is not None:
            texts[rel] = text

    doc_cache = {}

    def doc_text(path):
        if path not in doc_cache:
            try:
                doc_cache[path] = read_text(path) if os.path.isfile(path) else None
            except OSError:
                doc_cache[path] = None
        return doc_cache[path]

    for rel, text in texts.items():
        # Rule 1.
        for frag in FORBIDDEN:
            for m in re.finditer(re.escape(frag), text):
                problems.append("%s:%d: refers outside the repository ('%s')" %
                                (rel, line_of(text, m.start()), frag))
        # Rule 3.
        for m in CITE_DOC.finditer(text):
            target = os.path.join(root, "docs", m.group(1) + ".md")
            if not os.path.isfile(target):
                problems.append("%s:%d: cites docs/%s.md, which does not exist" %
                                (rel, line_of(text, m.start()), m.group(1)))
        # Rule 4.
        for m in CITE_SECTION.finditer(text):
            target = os.path.join(root, "docs", m.group(1) + ".md")
            doc = doc_text(target)
            if doc is None:
                continue  # reported by rule 3
            title = re.sub(r"\s*\n" + _GAP, " ", m.group(2)).strip()
            title = re.sub(r"\s+", " ", title)
            if title not in {plain(h) for h in headings(doc)} and title not in headings(doc):
                problems.append("%s:%d: cites docs/%s.md, section \"%s\", which has no such "
                                "heading" % (rel, line_of(text, m.start()), m.group(1), title))
        # Rule 5.
        for m in NUMBERED.finditer(text):
            problems.append("%s:%d: numbered section citation '%s...' (the documents have no "
                            "numbered sections)" % (rel, line_of(text, m.start()), m.group(0)))
        # Rule 6.
        if bare is not None and not rel.endswith(".md"):
            for m in bare.finditer(text):
                problems.append("%s:%d: cite %s.md as docs/%s.md" %
                                (rel, line_of(text, m.start()), m.group(1), m.group(1)))
        # Rule 2.
        if not rel.endswith(".md"):
            continue
        lines = strip_code(text.splitlines())
        for no, line in enumerate(lines, 1):
            for m in LINK.finditer(line):
                target = m.group(1)
                if SCHEME.match(target):
                    continue
                file_part, _, frag = target.partition("#")
                if file_part:
                    dest = os.path.normpath(os.path.join(root, os.path.dirname(rel),
                                                         unquote(file_part)))
                    if not (dest == root or dest.startswith(root + os.sep)):
                        problems.append("%s:%d: link '%s' leaves the repository" %
                                        (rel, no, target))
                        continue
                    if not os.path.exists(dest):
                        problems.append("%s:%d: link '%s': no such file" % (rel, no, target))
                        continue
                else:
                    dest = os.path.join(root, rel)
                if frag:
                    if not dest.endswith(".md") or os.path.isdir(dest):
                        continue  # anchors of non-Markdown targets are not checked
                    doc = doc_text(dest)
                    if doc is not None and unquote(frag).lower() not in anchors(doc):
                        problems.append("%s:%d: link '%s': no heading with anchor '#%s'" %
                                        (rel, no, target, frag))

    for w in warnings:
        print(w)
    for p in problems:
        print(p)
    if problems:
        print("docs_links: %d problem(s) in %d files checked" % (len(problems), len(texts)))
        return 1
    print("docs_links: %d files checked, no problems" % len(texts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
