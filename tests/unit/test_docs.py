"""The docs hold together: README is a front door, and every relative link and anchor resolves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
PAGES = sorted(
    [README, REPO / "ARCHITECTURE.md", *(REPO / "docs").glob("*.md"), *(REPO / "deploy").glob("**/README.md")]
)

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def _prose(text: str) -> str:
    """The text without fenced code blocks (where a ``#`` line is a comment, not a heading)."""
    return _FENCE.sub("", text)


def _anchors(path: Path) -> set[str]:
    """The ids GitHub gives the page's headings: lower case, punctuation dropped, spaces to hyphens."""
    seen: dict[str, int] = {}
    anchors = set()
    for heading in _HEADING.findall(_prose(path.read_text())):
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _links(path: Path) -> list[str]:
    return _LINK.findall(_CODE.sub("", _prose(path.read_text())))


def test_readme_is_a_front_door() -> None:
    assert README.stat().st_size <= 15 * 1024, "README.md is the front door: reference material goes in docs/"


def test_readme_shows_the_test_command_ci_runs() -> None:
    commands = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if "pytest" in line]
    assert commands and all(command.strip() in README.read_text() for command in commands)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_relative_links_and_anchors_resolve(page: Path) -> None:
    broken = []
    for target in _links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        resolved = (page.parent / file).resolve() if file else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, broken


def test_the_anchor_rule_matches_githubs() -> None:
    page = REPO / "docs" / "deployment.md"
    assert {"near-across-a-container-boundary", "systemd", "kubernetes"} <= _anchors(page)


def test_comments_cite_this_repository() -> None:
    """Code and tests cite docs a reader of this repository can open, not the product contract."""
    cited = re.compile(
        r"\b" + "SP" + r"EC\b(?!\s*=|\))|" + "PRE" + r"SETS\.md"
    )  # not bench's SPEC = LeaseSpec(...)
    found = [
        f"{path.relative_to(REPO)}:{number}"
        for folder in ("src", "tests", "bench", "deploy")
        for path in sorted((REPO / folder).rglob("*"))
        if path.is_file()
        and path.suffix in {".py", ".md", ".toml", ".yaml", ".yml", ".service", ".json", ""}
        and not any(part.endswith((".egg-info", "__pycache__")) for part in path.parts)
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if cited.search(line)
    ]
    found += [
        f"config.example.toml:{n}"
        for n, line in enumerate((REPO / "config.example.toml").read_text().splitlines(), 1)
        if cited.search(line)
    ]
    assert not found, found
