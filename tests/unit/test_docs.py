"""The README and the docs pages: every relative link resolves (the file, and the heading an anchor names), the
README stays short with its two commands first, and the docs cite files that exist."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import PROJECT_ROOT

PAGES = [PROJECT_ROOT / "README.md", *sorted((PROJECT_ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    out: set[str] = set()
    in_code = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (m := re.match(r"^#{1,6} (.+)$", line)):
            base, k = slug(m.group(1)), 1
            name = base
            while name in out:  # GitHub numbers repeated headings
                name, k = f"{base}-{k}", k + 1
            out.add(name)
    return out


def links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # not inside code blocks
    return [a or b for a, b in LINK.findall(text)]


def test_slugs_follow_github():
    assert slug("Does iw help? The claim study") == "does-iw-help-the-claim-study"
    assert slug("1. One-time setup (your machine)") == "1-one-time-setup-your-machine"
    assert slug("Real nodule shapes without a download: the LIDC chest phantom") == \
        "real-nodule-shapes-without-a-download-the-lidc-chest-phantom"


def test_every_link_of_the_readme_and_the_docs_resolves():
    broken = []
    for page in PAGES:
        for target in links(page):
            if re.match(r"^[a-z]+://|^mailto:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(PROJECT_ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page.relative_to(PROJECT_ROOT)}: {target} (no heading #{anchor})")
    assert len([t for p in PAGES for t in links(p)]) > 30  # the check really reads links
    assert broken == []


def test_the_readme_is_short_and_opens_with_its_two_commands():
    text = (PROJECT_ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    blocks = re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)
    assert blocks[0].endswith("pip install -e . && study launch")
    assert blocks[1].endswith('pip install -e ".[dev]" && python -m pytest')
    assert text.index("## Quick start") < text.index("## What the demo shows")


def test_the_files_the_docs_name_exist():
    missing = []
    for page in PAGES:
        for name in re.findall(r"`((?:study|trainables|tests|benchmarks|search_spaces|docs)/[\w./-]+\.(?:py|yaml|md|json))`",
                               page.read_text()):
            if not (PROJECT_ROOT / name).exists():
                missing.append(f"{page.relative_to(PROJECT_ROOT)}: {name}")
    assert missing == []
