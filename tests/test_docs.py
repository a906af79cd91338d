"""The documentation holds together: links resolve, design references name real sections, README is a front door.

- every relative link in README.md and docs/**/*.md points at a file that exists, and a ``#anchor``
  at a heading of the target (GitHub's slug rules);
- every "design §N" reference (also "DESIGN §N", "DESIGN.md section N", "docs/design.md §N") in the
  code, tests, scripts and configs names a numbered heading ``## N. ...`` of docs/design.md;
- nothing in the repository refers to a design file or a shared folder outside the repository;
- README.md stays a front door (at most 250 lines, the two quick-start commands) from which every
  docs page can be reached, and the repository paths the pages name exist.
"""
import os
import re
import unicodedata
from typing import Dict, Iterator, List, Set, Tuple

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DESIGN = os.path.join(REPO, "docs", "design.md")
THIS_FILE = os.path.abspath(__file__)

# folders that hold no project text: caches, build trees, runs and data (and hidden folders but .ci)
SKIPPED_DIRS = {"__pycache__", "build", "outputs", "data", "runs"}
CODE_SUFFIXES = (".py", ".sh", ".yaml", ".yml", ".cu", ".cuh", ".cpp", ".h", ".txt", ".ini", ".cfg", ".toml")
TEXT_SUFFIXES = CODE_SUFFIXES + (".md",)

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")
DESIGN_REF = re.compile(r"\b(?:docs/)?design(?:\.md)?\s*(?:§|section)\s*(\d+)", re.IGNORECASE)
NUMBERED_SECTION = re.compile(r"^##\s+(\d+)\.\s")
OUTSIDE_REF = re.compile(r"DESIGN\.md|\.\./shared\b|/work/shared\b")
REPO_PATH = re.compile(r"(?<![\w/.-])((?:scripts|configs|tests|models|ops|util|datasets|cli|runner|extras|docs)/[\w./-]*\w\.(?:py|sh|yaml|md|png|txt))")


def _walk(suffixes: Tuple[str, ...]) -> Iterator[str]:
    """Repository files ending in ``suffixes`` (plus extension-less scripts such as ``.ci/run``)."""
    for root, dirs, files in os.walk(REPO):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS and not d.endswith(".egg-info")
                         and (d == ".ci" or not d.startswith(".")))  # hidden: .git, a .venv, caches
        for name in sorted(files):
            path = os.path.join(root, name)
            if name.endswith(suffixes) or os.path.relpath(path, REPO) == os.path.join(".ci", "run"):
                yield path


def _markdown_files() -> List[str]:
    pages = [os.path.join(REPO, "README.md")]
    pages += [p for p in _walk((".md",)) if p.startswith(os.path.join(REPO, "docs") + os.sep)]
    return pages


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _prose_lines(text: str) -> Iterator[Tuple[int, str]]:
    """(line number, line) outside fenced code blocks, with inline code spans removed."""
    in_fence = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            yield number, re.sub(r"`[^`]*`", "", line)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: rendered text, lower case, only letters, digits, '-', '_'
    and spaces kept, spaces turned into '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = text.replace("`", "").replace("*", "")
    text = text.strip().lower()
    kept = "".join(c for c in text if c.isalnum() or c in " -_" or unicodedata.category(c).startswith("M"))
    return kept.replace(" ", "-")


def anchors(path: str) -> Set[str]:
    """Every heading anchor of a markdown file, with GitHub's -1, -2 suffixes for repeated ones."""
    seen: Dict[str, int] = {}
    result = set()
    in_fence = False
    for line in _read(path).splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        match = None if in_fence else HEADING.match(line)
        if match:
            slug = github_slug(match.group(2))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def broken_links(page: str, root: str = REPO) -> List[str]:
    """'page:line: target (why)' for every relative link of ``page`` that does not resolve within ``root``."""
    problems = []
    for number, line in _prose_lines(_read(page)):
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
                continue
            where = f"{os.path.relpath(page, root)}:{number}: {target}"
            file_part, _, anchor = target.partition("#")
            resolved = os.path.normpath(os.path.join(os.path.dirname(page), file_part)) if file_part else page
            if os.path.relpath(resolved, root).startswith(os.pardir):
                problems.append(f"{where} (outside the repository)")
            elif not os.path.exists(resolved):
                problems.append(f"{where} (no such file)")
            elif anchor and (not resolved.endswith(".md") or anchor not in anchors(resolved)):
                problems.append(f"{where} (no heading with anchor #{anchor})")
    return problems


def design_sections() -> Set[int]:
    return {int(m.group(1)) for m in map(NUMBERED_SECTION.match, _read(DESIGN).splitlines()) if m}


def test_github_slug_follows_githubs_rules():
    assert github_slug("6. The reference-point generator") == "6-the-reference-point-generator"
    assert github_slug("Contrastive denoising (DINO)") == "contrastive-denoising-dino"
    assert github_slug("What `summarize.py` reports") == "what-summarizepy-reports"
    assert github_slug("Data: COCO minitrain") == "data-coco-minitrain"
    assert github_slug("2026-11-30: a first reading – D1–D6") == "2026-11-30-a-first-reading--d1d6"
    assert github_slug("Files § [here](x.md)") == "files--here"


def test_every_relative_link_resolves():
    pages = _markdown_files()
    assert len(pages) > 5, pages
    problems = [p for page in pages for p in broken_links(page)]
    assert problems == [], "\n".join(problems)


def test_a_broken_link_is_reported(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other\n\n## 2. A section\n")
    page.write_text("# Page\n\n[ok](other.md#2-a-section) [self](#page) [gone](missing.md) "
                    "[bad anchor](other.md#3-no-section) [web](https://example.com/x.md)\n"
                    "```\n[in code](nowhere.md)\n```\n![up](../shared/x.png) `[code span](nowhere.md)`\n")
    problems = broken_links(str(page), root=str(tmp_path))
    assert len(problems) == 3, problems
    assert "missing.md (no such file)" in problems[0]
    assert "other.md#3-no-section (no heading with anchor #3-no-section)" in problems[1]
    assert "../shared/x.png (outside the repository)" in problems[2]


def test_design_sections_are_numbered_in_order():
    numbers = sorted(design_sections())
    assert numbers == list(range(1, len(numbers) + 1)) and len(numbers) >= 10, numbers


def test_every_design_reference_names_a_section():
    sections = design_sections()
    references, missing = 0, []
    for path in _walk(TEXT_SUFFIXES):
        for number, line in enumerate(_read(path).splitlines(), 1):
            for match in DESIGN_REF.finditer(line):
                references += 1
                if int(match.group(1)) not in sections:
                    missing.append(f"{os.path.relpath(path, REPO)}:{number}: {match.group(0)}")
    assert references > 0
    assert missing == [], f"no such section in docs/design.md: {missing}"


def test_nothing_refers_outside_the_repository():
    offending = []
    for path in _walk(TEXT_SUFFIXES):
        if path == THIS_FILE:
            continue
        for number, line in enumerate(_read(path).splitlines(), 1):
            if OUTSIDE_REF.search(line):
                offending.append(f"{os.path.relpath(path, REPO)}:{number}: {line.strip()[:100]}")
    assert offending == [], "\n".join(offending)


def _linked_pages(page: str) -> Set[str]:
    found = set()
    for _, line in _prose_lines(_read(page)):
        for target in LINK.findall(line):
            file_part = target.partition("#")[0]
            if file_part.endswith(".md") and not re.match(r"^[a-z]+:", file_part):
                found.add(os.path.normpath(os.path.join(os.path.dirname(page), file_part)))
    return found


def test_readme_is_a_front_door_to_every_page():
    readme = os.path.join(REPO, "README.md")
    text = _read(readme)
    assert len(text.splitlines()) <= 250
    quick_start = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "\nbash scripts/demo.sh " in quick_start and "\nbash scripts/test.sh " in quick_start
    reached, todo = set(), [readme]
    while todo:
        page = todo.pop()
        for target in _linked_pages(page) - reached:
            reached.add(target)
            if os.path.exists(target):
                todo.append(target)
    unreachable = [os.path.relpath(p, REPO) for p in _markdown_files()[1:] if p not in reached]
    assert unreachable == [], f"docs pages no link leads to from README.md: {unreachable}"


@pytest.mark.parametrize("page", [os.path.relpath(p, REPO) for p in _markdown_files()])
def test_named_repository_paths_exist(page):
    named = REPO_PATH.findall(_read(os.path.join(REPO, page)))
    missing = sorted({path for path in named if not os.path.exists(os.path.join(REPO, path))})
    assert missing == [], f"{page} names files that do not exist: {missing}"
