"""The README and the docs site: the site builds with warnings as errors (broken links fail it), the configuration
reference is the one the code gives, and the README stays a short page whose links resolve."""

import dataclasses
import importlib.util
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tiny_run import REPO

from clipzss.config import Config, flatten

MKDOCS = Path(sys.executable).parent / "mkdocs"
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def reference_module():
    spec = importlib.util.spec_from_file_location("config_reference", REPO / "docs" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(docs: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(MKDOCS), "build", "--strict", "-f", str(docs / "mkdocs.yml")],
        capture_output=True,
        text=True,
        env={"PATH": str(MKDOCS.parent), "NO_MKDOCS_2_WARNING": "1", "HOME": str(docs)},
    )


def test_field_comments_joins_the_lines_above_a_field_and_its_own():
    source = textwrap.dedent(
        '''
        @dataclass
        class Part:
            """A part."""

            plain: int = 1
            inline: int = 2  # says why
            # above, first line
            # and second line
            both: str = (
                "x"  # inside the parentheses
            )
        '''
    )
    comments = reference_module().field_comments(source)
    assert comments == {
        ("Part", "plain"): "",
        ("Part", "inline"): "says why",
        ("Part", "both"): "above, first line and second line inside the parentheses",
    }


def test_configuration_page_lists_every_key_with_its_default_and_comment():
    page = (REPO / "docs" / "pages" / "configuration.md").read_text()
    rows = {line.split("|")[1].strip().strip("`"): line for line in page.splitlines() if line.startswith("| `")}
    for key in flatten(Config()):
        assert key in rows, f"{key} missing from the configuration reference"
    assert "| `data.batch_size` | int | `16` | per process |" in page
    assert "| `plm.kmeans.scales` | list of int | `[4, 8, 16]` | [choice] window sizes in tokens" in page
    assert '`teacher.dense` | `"value"` \\| `"tokens"` | `value`' in page
    sections = [f.name for f in dataclasses.fields(Config)] + ["plm.kmeans", "plm.synthesizer"]
    assert all(f"\n## {name}\n" in page for name in sections)
    assert "| `glm.weight` |  |  | `0.5` |  |" in page  # the synthetic preset's delta, in its column


def test_check_passes_on_the_committed_page_and_fails_on_a_stale_one(tmp_path):
    script = str(REPO / "docs" / "config_reference.py")
    fresh = subprocess.run([sys.executable, script, "--check"], capture_output=True, text=True, cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr
    stale = tmp_path / "configuration.md"
    stale.write_text((REPO / "docs" / "pages" / "configuration.md").read_text().replace("per process", "per GPU"))
    result = subprocess.run([sys.executable, script, "--check", "--page", str(stale)], capture_output=True, text=True)
    assert result.returncode == 1 and "is stale: run python docs/config_reference.py" in result.stderr


@pytest.fixture
def docs_copy(tmp_path: Path) -> Path:
    docs = tmp_path / "docs"
    shutil.copytree(REPO / "docs", docs, ignore=shutil.ignore_patterns("__pycache__"))
    return docs


def test_site_builds_strict(docs_copy):
    result = build(docs_copy)
    assert result.returncode == 0, result.stderr
    assert (docs_copy.parent / "build" / "site" / "configuration" / "index.html").exists()


def test_strict_build_fails_on_a_broken_link_and_a_missing_anchor(docs_copy):
    index = docs_copy / "pages" / "index.md"
    index.write_text(index.read_text() + "\n[gone](no-such-page.md)\n")
    result = build(docs_copy)
    assert result.returncode != 0 and "no-such-page.md" in result.stderr
    index.write_text(index.read_text().replace("(no-such-page.md)", "(training.md#no-such-heading)"))
    result = build(docs_copy)
    assert result.returncode != 0 and "no-such-heading" in result.stderr


def test_readme_is_short_and_its_links_resolve():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    targets = [t for t in LINK.findall(readme) if not t.startswith(("http://", "https://", "#"))]
    assert any(t.startswith("docs/pages/") for t in targets)
    for target in targets:
        assert (REPO / target.split("#")[0]).exists(), f"README links to a missing file: {target}"


def test_readme_and_pages_carry_no_tracker_references():
    texts = [REPO / "README.md", REPO / "CHANGELOG.md", *sorted((REPO / "docs" / "pages").glob("*.md"))]
    for path in texts:
        found = re.findall(r"\bissues? #?\d+|\bthe issue\b", path.read_text(), flags=re.IGNORECASE)
        assert not found, f"{path.name}: {found}"
