"""The README stays a landing page, and the documentation's links lead somewhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOC_PAGES = sorted((ROOT / "docs").glob("*.md"))
# Every page whose relative links are checked.
LINKING_PAGES = [README, *DOC_PAGES, ROOT / "benchmarks" / "README.md"]

README_LIMIT = 12_000

# [text](target) and ![alt](target); the target ends at whitespace or ')'.
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def _prose(text: str) -> str:
    """``text`` without code blocks and inline code, where brackets are not links."""
    return _INLINE_CODE.sub("", _FENCE.sub("", text))


def _relative_links(page: Path) -> list[str]:
    links = _LINK.findall(_prose(page.read_text(encoding="utf-8")))
    return [link for link in links if not re.match(r"^[a-z][a-z0-9+.-]*:", link)]


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = _FENCE.sub("", page.read_text(encoding="utf-8"))
    return {_anchor(h) for h in _HEADING.findall(text)}


def test_readme_is_a_landing_page() -> None:
    size = len(README.read_text(encoding="utf-8"))
    assert size <= README_LIMIT, (
        f"README.md has {size} characters, more than {README_LIMIT}: move detail to docs/"
    )


def test_docs_exist() -> None:
    names = {p.name for p in DOC_PAGES}
    for expected in (
        "kafka.md",
        "lake-format.md",
        "type-mapping.md",
        "operations.md",
        "maintenance.md",
        "schema-changes.md",
        "development.md",
    ):
        assert expected in names


@pytest.mark.parametrize("page", LINKING_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    links = _relative_links(page)
    broken = []
    for link in links:
        target_text, _, fragment = link.partition("#")
        target = (page.parent / target_text).resolve() if target_text else page
        if not target.exists():
            broken.append(f"{link}: no file {target}")
        elif fragment and target.suffix == ".md" and fragment not in _anchors(target):
            broken.append(f"{link}: no heading with anchor #{fragment} in {target.name}")
    assert not broken, f"{page.relative_to(ROOT)} has broken links:\n" + "\n".join(broken)


def test_every_doc_page_is_linked_from_the_readme() -> None:
    linked = {
        (ROOT / link.partition("#")[0]).resolve()
        for link in _relative_links(README)
        if link.partition("#")[0]
    }
    unlinked = [p.name for p in DOC_PAGES if p.resolve() not in linked]
    assert not unlinked, f"docs pages not linked from README.md: {unlinked}"
    assert (ROOT / "benchmarks" / "README.md").resolve() in linked


def test_link_checker_sees_links_and_anchors(tmp_path: Path) -> None:
    """The checks above would pass vacuously if the patterns found nothing."""
    page = tmp_path / "page.md"
    page.write_text(
        "# The `_cdc` directory\n\nSee [a](other.md#x), ![img](pic.png), [web](https://x.y), "
        "`[not](code.md)`.\n\n```\n[nor](fenced.md)\n```\n",
        encoding="utf-8",
    )
    assert _relative_links(page) == ["other.md#x", "pic.png"]
    assert _anchors(page) == {"the-_cdc-directory"}
    assert len(_relative_links(README)) >= 8
