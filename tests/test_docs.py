"""The documentation holds together: every relative link of README.md, docs/*.md and
bench/README.md points at a file (or folder) of the repository -- and at a heading that exists,
when it names one -- the README stays a ten-minute read, and its test command is the one CI
runs."""
import functools
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")),
        "bench/README.md"]
README_MAX_LINES = 250
TEST_COMMAND = ('python -m venv .venv && . .venv/bin/activate && pip install -e ".[test]" '
                '&& python -m pytest')

INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
FENCE = re.compile(r"^\s{0,3}(```|~~~)")
HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$")


def _prose_lines(text: str):
    """(line number, line) outside fenced code blocks."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if m:
            if fence is None:
                fence = m.group(1)
            elif m.group(1) == fence:
                fence = None
            continue
        if fence is None:
            yield number, line


@functools.lru_cache(maxsize=None)
def _repository_files() -> frozenset:
    """The files git tracks (the repository a clone gets); outside a git checkout, every file."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                             check=True).stdout.decode()
        return frozenset(p for p in out.split("\0") if p)
    except (OSError, subprocess.CalledProcessError):
        return frozenset(p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*") if p.is_file())


def _exists(rel: str) -> bool:
    """A tracked file that is on disk, or a folder holding one."""
    files = _repository_files()
    if rel in files:
        return (ROOT / rel).is_file()
    prefix = rel.rstrip("/") + "/"
    return (ROOT / rel).is_dir() and any(f.startswith(prefix) for f in files)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to -."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)    # a link's text only
    text = text.replace("`", "").strip().lower()
    text = "".join(ch for ch in text if ch.isalnum() or ch in " -_")
    return text.replace(" ", "-")


@functools.lru_cache(maxsize=None)
def anchors(rel: str) -> frozenset:
    seen: dict = {}
    out = set()
    for _, line in _prose_lines((ROOT / rel).read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return frozenset(out)


def links(rel: str):
    """(line number, target) of every link in a markdown file's prose (fenced code and code
    spans left out; a link's text may run over several lines)."""
    lines = (ROOT / rel).read_text(encoding="utf-8").splitlines()
    prose = dict(_prose_lines("\n".join(lines)))
    for number, line in prose.items():
        m = REFERENCE_LINK.match(line)
        if m:
            yield number, m.group(1)
    # fenced lines blanked, so that offsets still map to line numbers
    text = "\n".join(CODE_SPAN.sub("``", prose.get(n, "")) for n in range(1, len(lines) + 1))
    for m in INLINE_LINK.finditer(text):
        yield text.count("\n", 0, m.start()) + 1, m.group(1)


def _broken(rel: str, target: str):
    """Why a link of ``rel`` does not work, or None."""
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):      # https:, mailto:, ...
        return None
    path, _, anchor = target.partition("#")
    if path.startswith("/"):
        return "absolute path: links must be relative to the file"
    if path:
        resolved = os.path.normpath(os.path.join(os.path.dirname(rel), path)).replace(os.sep, "/")
        if resolved.startswith("../") or resolved == "..":
            return "points outside the repository"
        if not _exists(resolved):
            return f"{resolved} is not a file of the repository (git ls-files)"
    else:
        resolved = rel
    if anchor and resolved.endswith(".md") and anchor not in anchors(resolved):
        return f"{resolved} has no heading with the anchor #{anchor}"
    return None


@pytest.mark.parametrize("rel", DOCS)
def test_every_relative_link_works(rel):
    assert (ROOT / rel).is_file(), f"{rel} is missing"
    found = list(links(rel))
    bad = [f"{rel}:{n}: ({t}) {why}" for n, t in found if (why := _broken(rel, t))]
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_the_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines, at most {README_MAX_LINES}"


def test_the_readme_test_command_is_what_ci_runs():
    assert TEST_COMMAND in (ROOT / "README.md").read_text(encoding="utf-8")
    ci = ROOT / ".ci" / "run"
    if ci.is_file():
        assert TEST_COMMAND in ci.read_text(encoding="utf-8")


def test_the_checker_finds_links_and_anchors():
    assert slug("Models: convert, fuse, fold") == "models-convert-fuse-fold"
    assert slug("Tuning: `tritonbn tune`") == "tuning-tritonbn-tune"
    assert slug("Half precision near 65,504") == "half-precision-near-65504"
    line = "see [a](docs/a.md#x), ![img](b.png \"title\") and `[not](a-link.md)` or https://x.y"
    assert [m.group(1) for m in INLINE_LINK.finditer(CODE_SPAN.sub("``", line))] == [
        "docs/a.md#x", "b.png"]
    assert _broken("README.md", "docs/no-such-file.md") is not None
    assert _broken("README.md", "README.md#no-such-heading") is not None
    assert _broken("docs/development.md", "../README.md") is None
    assert _broken("README.md", "https://example.com/missing") is None
    assert _broken("README.md", "/etc/passwd") is not None


def _design_tree() -> set[str]:
    """The files docs/design.md's layout tree names under kernels/ and tritonbn/ (an entry
    "a.py, b.py   text" names several)."""
    text = (ROOT / "docs" / "design.md").read_text()
    block = text[text.index("```\nkernels/"):]
    block = block[4:block.index("```", 4)]
    named, stack = set(), []
    for line in block.splitlines():
        if not line.strip():
            continue
        indent = (len(line) - len(line.lstrip())) // 2
        entry = line.strip().split("   ")[0].split("  ")[0]
        names = [n.strip() for n in entry.split(",")] if "," in entry else [entry.split()[0]]
        if names[0].endswith("/"):
            stack = stack[:indent] + [names[0]]
            continue
        stack = stack[:indent]
        named.update("".join(stack) + n for n in names)
    return {n for n in named if n.startswith(("kernels/", "tritonbn/"))}


def test_design_tree_names_every_file_of_the_package():
    files = subprocess.run(["git", "ls-files", "tritonbn", "kernels"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    assert _design_tree() == set(files)
