"""The README a newcomer reads in five minutes, and the docs it links to: every relative link in README.md and
docs/*.md points at a file that exists and, with a #fragment, at a heading of that file (GitHub's anchors)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .helpers import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but '-' and '_' dropped, spaces to '-', repeats -1, -2."""
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text())
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]  # not http:, mailto:


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_points_at_a_file_and_heading_that_exist(doc):
    broken = []
    for target in links(doc):
        file_part, _, fragment = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{fragment} in {dest.name}")
    assert not broken, broken


def test_the_readme_is_read_in_five_minutes_and_links_every_doc():
    readme = ROOT / "README.md"
    assert len(readme.read_text().splitlines()) <= 150
    linked = {(readme.parent / t.partition("#")[0]).resolve() for t in links(readme)}
    unlinked = [d.name for d in DOCS[1:] if d.resolve() not in linked]
    assert not unlinked, f"docs the README does not link to: {unlinked}"


def test_the_anchor_rule_is_githubs():
    """A few headings of this repository, with the anchors GitHub gives them."""
    sample = ROOT / "docs" / "benchmarks.md"
    found = anchors(sample)
    for slug in ("verify-on-two-connections-issue-16-item-5", "footprint-wal-size-and-a-real-standby"):
        assert slug in found, slug
