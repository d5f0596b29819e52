"""The documentation: the README as a front door, the MkDocs site's API page and links, public citations."""

from __future__ import annotations

import html
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"

# [text](target) and ![alt](target); the target ends at whitespace or the closing parenthesis
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
INTERNAL_NAME = re.compile(r"seed[ -]00[0-9]", re.I)


def exported_methods() -> list[type]:
    """Every name of ``kd_lightning.methods.__all__`` that is a ``DistillationModule`` subclass."""
    import kd_lightning.methods as methods

    return [obj for name in methods.__all__
            if isinstance(obj := getattr(methods, name), type)
            and issubclass(obj, methods.DistillationModule)]


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def relative_links(path: Path) -> list[str]:
    """The relative link targets of a markdown file, outside code blocks and code spans."""
    text = INLINE_CODE.sub("", FENCE.sub("", path.read_text(encoding="utf-8")))
    targets = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith(("#", "/")):
            continue                                     # a URL, an anchor on the same page
        targets.append(target.split("#", 1)[0])
    return targets


def test_readme_is_a_front_door_of_at_most_300_lines():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move detail to docs/"


def test_every_relative_link_in_readme_and_docs_points_to_an_existing_file():
    checked, missing = 0, []
    for path in markdown_files():
        for target in relative_links(path):
            checked += 1
            if not (path.parent / target).exists():
                missing.append(f"{path.relative_to(ROOT)} -> {target}")
    assert checked > 20, "the link pattern found almost no links: it is broken"
    assert not missing, "links to files that do not exist:\n" + "\n".join(missing)


def test_link_checker_sees_links_and_skips_code(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[a](other.md#x) ![img](images/p.png) [web](https://example.org) [top](#t)\n"
                    "`[not](code.md)`\n```\n[neither](block.md)\n```\n", encoding="utf-8")
    assert relative_links(page) == ["other.md", "images/p.png"]


def test_no_internal_document_names_in_code_readme_or_docs():
    """Public papers are cited, never internal documents ("seed 001 section 9")."""
    hits = []
    for base in (ROOT / "kd_lightning", README, DOCS):
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        for path in files:
            if "__pycache__" in path.parts or path.suffix in {".png", ".pyc"}:
                continue
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if INTERNAL_NAME.search(line):
                    hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not hits, "internal document names (cite the public paper instead):\n" + "\n".join(hits)


def test_the_methods_page_is_generated_from_every_exported_method():
    """The page source holds a marker, not a list: the hook fills in every exported method."""
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("methods_api", DOCS / "_hooks" / "methods_api.py")
    hook = module_from_spec(spec)
    spec.loader.exec_module(hook)
    assert hook.MARKER in (DOCS / "methods.md").read_text(encoding="utf-8")
    entries = re.findall(r"^::: (\S+)\n(?:    .*\n)*?      members: \[(.*)\]$", hook.api_entries(), re.M)
    listed = sorted(f"{module}.{name}" for module, names in entries for name in names.split(", "))
    expected = sorted(f"{cls.__module__}.{cls.__qualname__}" for cls in exported_methods())
    assert listed == expected
    assert len(expected) >= 20


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None
                    or importlib.util.find_spec("mkdocstrings") is None,
                    reason="the docs extra is not installed: pip install -e '.[docs]'")
def test_every_exported_method_has_an_entry_on_the_built_api_page(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    build = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet",
                            "--site-dir", str(tmp_path / "site")],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, f"mkdocs build --strict failed:\n{build.stdout}\n{build.stderr}"
    page = (tmp_path / "site" / "methods" / "index.html").read_text(encoding="utf-8")
    missing = [cls.__name__ for cls in exported_methods()
               if f'id="{cls.__module__}.{cls.__qualname__}"' not in page]
    assert not missing, f"exported methods without an entry on the API page: {missing}"
    # the adding-a-method recipe is the shipped example, verbatim: every line of its files
    recipe = html.unescape(re.sub(r"<[^>]+>", "", (tmp_path / "site" / "adding-a-method"
                                                   / "index.html").read_text(encoding="utf-8")))
    for shipped in ("kd_lightning/losses/logit_matching.py", "kd_lightning/methods/logit_matching.py",
                    "configs/mnist1d/logit_matching.yaml",
                    "tests/methods/test_logit_matching.py"):
        absent = [line for line in (ROOT / shipped).read_text(encoding="utf-8").splitlines()
                  if line.strip() and line not in recipe]
        assert not absent, f"{shipped} is not shown verbatim on the recipe page: {absent[:3]}"
