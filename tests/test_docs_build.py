"""The documentation site builds with ``mkdocs build --strict``: no broken link or anchor, no page left
out of the navigation (``mkdocs.yml``), so the docs cannot rot unseen."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_docs_build_strictly(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    pages = {path.relative_to(tmp_path / "site").as_posix() for path in (tmp_path / "site").rglob("index.html")}
    for page in ("index.html", "usage/index.html", "user-guide/index.html", "troubleshooting/index.html",
                 "models/index.html", "benchmarks/index.html", "architecture/index.html"):
        assert page in pages
    assert (tmp_path / "site" / "images" / "stain-side-by-side.png").exists()  # images travel with the pages


def test_every_page_in_docs_is_in_the_navigation():
    import yaml

    def paths(entries) -> list[str]:
        found = []
        for entry in entries:
            value = next(iter(entry.values())) if isinstance(entry, dict) else entry
            found += paths(value) if isinstance(value, list) else [value]
        return found

    nav = set(paths(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]))
    pages = {path.relative_to(ROOT / "docs").as_posix() for path in (ROOT / "docs").rglob("*.md")}
    assert pages == nav
