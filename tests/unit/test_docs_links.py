"""Everything the repository cites lives in the repository.

Code comments, tests, tools and docs cite ``docs/<file>.md#<anchor>`` sections, never the
working notes the project was built from (a spec folder, audit notes, issue or hole
numbers) and never a path on somebody's machine.  Two checks keep it that way:

* no file cites a document outside the repository or names an absolute path under
  ``/work``, ``/home`` or ``/root``;
* every ``docs/<file>.md#<anchor>`` cited anywhere, and every relative Markdown link in
  ``docs/`` and ``README.md``, points at a file that exists and, with an anchor, at a
  heading of that file (GitHub's slugs) or an explicit ``<a id=…>``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Final

import pytest

ROOT: Final = Path(__file__).resolve().parents[2]
SCANNED: Final = (
    "harp", "twisted", "tests", "bench", "tools", "docs", "README.md", "Dockerfile", ".ci",
)
SKIP_DIRS: Final = frozenset({"__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache"})
SKIP_SUFFIXES: Final = frozenset({".pyc", ".pem", ".crt", ".key", ".tar", ".gz", ".png"})

#: Citations of documents that are not part of the repository.  Built from pieces so
#: that this file does not match itself.
_SPEC: Final = "spe" + "c"
_OUTSIDE: Final = re.compile(
    "|".join(
        (
            r"shared/" + _SPEC,
            r"\b(?:frp-protocol|appapi-client|audit-notes|k8s-notes|harp-" + _SPEC + r")\.md\b",
            r"\breference-behaviou?r\b",
            r"\baudit[ -]notes?\b",
            r"\b" + _SPEC + r"\s*(?:§|section|readme|difference)",
            # "the spec says ...", but not a Kubernetes object's "spec"
            r"\bthe " + _SPEC + r"(?:'s)?\s+(?:found|names|says|asks|requires)\b",
            r"\b(?:deliberate\s+)?differences?\s+#?\d",
            r"\bhardening\s+(?:holes?|issue)\b",
            r"\bholes?\s+\d",
            r"\bissue\s+\d",
        )
    ),
    re.IGNORECASE,
)
#: ``§`` is only for RFC sections ("RFC 9110 §7.6.1"); anything else cites a spec.
_SECTION_SIGN: Final = "\u00a7"
_RFC_BEFORE: Final = re.compile(r"RFC\s?\d+[^§]{0,12}$")
#: An absolute path on a particular machine.
_MACHINE_PATH: Final = re.compile(r"(?<![\w.$}~-])/(?:work|home|root)/")

_DOC_REF: Final = re.compile(r"\bdocs/([\w.-]+\.md)(?:#([\w-]+))?")
_MD_LINK: Final = re.compile(r"\]\(([^)\s]*?)(?:#([^)\s]+))?\)")
_HEADING: Final = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_EXPLICIT_ANCHOR: Final = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"", re.IGNORECASE)


def _files() -> Iterator[Path]:
    me = Path(__file__).resolve()
    for name in SCANNED:
        top = ROOT / name
        paths = [top] if top.is_file() else sorted(top.rglob("*"))
        for path in paths:
            if (
                path.is_file()
                and path.resolve() != me
                and not SKIP_DIRS.intersection(path.relative_to(ROOT).parts)
                and path.suffix not in SKIP_SUFFIXES
            ):
                yield path


def _text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None  # binary


def _lines() -> Iterator[tuple[str, int, str]]:
    for path in _files():
        text = _text(path)
        if text is not None:
            rel = path.relative_to(ROOT).as_posix()
            for number, line in enumerate(text.splitlines(), 1):
                yield rel, number, line


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to ``-``."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts as its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@cache
def anchors(doc: Path) -> frozenset[str]:
    """Every anchor ``doc`` offers: heading slugs (``-1``, ``-2`` … for repeats) and ids."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    in_fence = False
    for line in doc.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        found.update(_EXPLICIT_ANCHOR.findall(line))
        heading = _HEADING.match(line)
        if heading is None:
            continue
        base = slug(heading.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return frozenset(found)


def test_slug_matches_github() -> None:
    assert slug("Docker allow-list") == "docker-allow-list"
    assert slug("Workers (`HP_WORKERS` > 1)") == "workers-hp_workers--1"
    assert slug("Known limits: what is still weak") == "known-limits-what-is-still-weak"
    assert slug("3") == "3"


def test_nothing_cites_documents_outside_the_repository() -> None:
    found = []
    for rel, number, line in _lines():
        hit = _OUTSIDE.search(line)
        if hit is not None:
            found.append(f"{rel}:{number}: {hit.group(0)!r}: {line.strip()[:120]}")
        start = line.find(_SECTION_SIGN)
        while start != -1:
            if not _RFC_BEFORE.search(line[:start]):
                found.append(f"{rel}:{number}: section sign outside an RFC citation: "
                             f"{line.strip()[:120]}")
                break
            start = line.find(_SECTION_SIGN, start + 1)
    assert not found, "cite docs/<file>.md#<section> instead:\n" + "\n".join(found)


def test_no_absolute_machine_paths() -> None:
    found = [
        f"{rel}:{number}: {line.strip()[:120]}"
        for rel, number, line in _lines()
        if _MACHINE_PATH.search(line)
    ]
    assert not found, "use paths relative to the repository or tmp_path:\n" + "\n".join(found)


def _cited() -> Iterator[tuple[str, int, Path, str | None]]:
    """(where, line, target document, anchor) for every docs/ citation and Markdown link."""
    for rel, number, line in _lines():
        for match in _DOC_REF.finditer(line):
            yield rel, number, ROOT / "docs" / match.group(1), match.group(2)
        if not rel.endswith(".md"):
            continue
        for match in _MD_LINK.finditer(line):
            target, anchor = match.group(1), match.group(2)
            if re.match(r"[a-z][a-z0-9+.-]*:", target):
                continue  # http:, https:, mailto: ...
            if target and not target.endswith(".md"):
                if not (ROOT / rel).parent.joinpath(target).exists():
                    yield rel, number, (ROOT / rel).parent / target, None
                continue
            doc = (ROOT / rel).parent / target if target else ROOT / rel
            yield rel, number, doc, anchor


def test_cited_doc_sections_exist() -> None:
    broken = []
    for rel, number, doc, anchor in _cited():
        if not doc.exists():
            broken.append(f"{rel}:{number}: {doc.relative_to(ROOT)} does not exist")
        elif anchor is not None and doc.suffix == ".md" and anchor not in anchors(doc):
            broken.append(f"{rel}:{number}: {doc.relative_to(ROOT)} has no section #{anchor}")
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("name", ["architecture", "configuration", "compatibility", "differences"])
def test_core_docs_exist(name: str) -> None:
    assert (ROOT / "docs" / f"{name}.md").is_file()


def test_every_configuration_variable_is_documented() -> None:
    """docs/configuration.md names every variable harp/config/ reads."""
    source = "".join(p.read_text() for p in sorted((ROOT / "harp" / "config").glob("*.py")))
    read = set(re.findall(r"\"((?:HP|NC)_[A-Z_]+)\"", source))
    documented = (ROOT / "docs" / "configuration.md").read_text()
    missing = sorted(v for v in read if f"`{v}`" not in documented)
    assert read and not missing, missing
