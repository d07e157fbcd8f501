"""The README and docs/ are what a user reads first: every relative link must lead somewhere, anchors included, and
the README stays a short start-here page."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens (code fences skipped)."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.MULTILINE)}


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto: not checked offline
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken


def test_the_readme_is_a_start_page_for_each_reader():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 12_000
    for page in ("pacs-integration", "training", "batch-scoring", "review-ui", "deployment", "dicom-reading",
                 "benchmarks"):
        assert f"docs/{page}.md" in readme, page
    assert not re.search(r"\bissue [A-Z]?\d|\bM\d\b|work item", readme + "".join(p.read_text() for p in PAGES))
