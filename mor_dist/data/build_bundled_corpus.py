"""Rebuild the bundled corpus from the Python 3.11 documentation shipped in Debian's python3.11-doc.

On Debian 12 (needs `apt-get download` and `dpkg-deb`):

    python -m mor_dist.data.build_bundled_corpus            # downloads python3.11-doc
    python -m mor_dist.data.build_bundled_corpus --deb X.deb  # uses a .deb already at hand

It keeps the prose of the reStructuredText sources (`html/_sources/<section>/**/*.rst.txt` for the
SECTIONS below): markup, directives, code samples and interactive sessions are removed; documents
under MIN_WORDS words and library pages over MAX_LIBRARY_CHARS characters are left out. One
document per source file goes to `bundled/corpus/python-docs.jsonl.gz` as {"text", "source"}; the
package's copyright file is copied next to it. Re-runs on the same package version give identical
bytes.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

PACKAGE = "python3.11-doc"
SOURCES_ROOT = Path("usr/share/doc/python3.11/html/_sources")
COPYRIGHT = Path("usr/share/doc/python3.11-doc/copyright")
SECTIONS = ("tutorial", "howto", "faq", "reference", "using", "installing", "extending", "library",
            "glossary.rst.txt")
MIN_WORDS = 150
MAX_LIBRARY_CHARS = 15_000  # longer library pages are mostly API listings (and would triple the size)
OUT_DIR = Path(__file__).resolve().parent / "bundled" / "corpus"

# directives whose whole body is code, tables, indices or metadata
DROP_BODY = {
    "code-block", "sourcecode", "code", "doctest", "testcode", "testsetup", "testcleanup", "testoutput",
    "literalinclude", "productionlist", "toctree", "index", "highlight", "tabularcolumns", "list-table",
    "csv-table", "table", "image", "figure", "raw", "include", "audit-event", "module", "moduleauthor",
    "sectionauthor", "currentmodule", "program", "availability", "only", "opcode", "pdbcommand",
}
VERSION_NOTES = {"versionadded": "New in version", "versionchanged": "Changed in version",
                 "deprecated": "Deprecated since version"}

DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::\s*(.*)$")
COMMENT = re.compile(r"^(\s*)\.\.(\s|$)")
OPTION = re.compile(r"^\s+:[\w -]+:")
ADORNMENT = re.compile(r"^\s*([=\-~^\"'*+#`:._])\1{3,}\s*$")
TABLE_LINE = re.compile(r"^\s*(\+[-=+]+\+|=+( +=+)+|\|.*)\s*$")
ROLE = re.compile(r":[\w:+-]+:`([^`]+)`")
LITERAL = re.compile(r"``(.+?)``")
LINK = re.compile(r"`([^`<]+?)\s*(<[^>]*>)?`__?")
DEFAULT_ROLE = re.compile(r"`([^`]+)`")
FOOTNOTE_REF = re.compile(r"\s*\[[#*\w-]*\]_")
STRONG = re.compile(r"\*\*(\S(?:[^*]*?\S)?)\*\*")
EMPHASIS = re.compile(r"(?<![\w*\\])\*(\S(?:[^*]*?\S)?)\*(?![\w*])")


def _role_text(match: re.Match[str]) -> str:
    """Render `:role:`target`` as the words a reader would see."""
    whole, inner = match.group(0), match.group(1)
    titled = re.match(r"(.*?)\s*<[^>]+>$", inner, re.S)
    if titled and titled.group(1):
        return titled.group(1)
    inner = inner.lstrip("!")
    if inner.startswith("~"):
        inner = inner[1:].rsplit(".", 1)[-1]
    if whole.startswith(":pep:"):
        return f"PEP {inner}"
    if whole.startswith(":rfc:"):
        return f"RFC {inner}"
    return inner


def inline(text: str) -> str:
    """Strip reST inline markup from one line."""
    text = ROLE.sub(_role_text, text)
    text = LITERAL.sub(r"\1", text)
    text = FOOTNOTE_REF.sub("", text)
    text = LINK.sub(r"\1", text)
    text = DEFAULT_ROLE.sub(r"\1", text)
    text = STRONG.sub(r"\1", text)
    text = EMPHASIS.sub(r"\1", text)
    text = text.replace("|release|", "3.11").replace("|version|", "3.11")
    return text.replace("\\ ", "").replace("\\", "")


def indent_of(line: str) -> int:
    """Number of leading spaces."""
    return len(line) - len(line.lstrip(" "))


def rst_to_text(source: str) -> str:
    """Keep the prose of a reST document: no directives' code, no literal blocks, no markup."""
    out: list[str] = []
    skip_above: int | None = None  # drop lines indented more than this (a block being skipped)
    literal_after: int | None = None  # a paragraph ended with '::' at this indent
    in_options = False
    in_session = False
    for raw in source.expandtabs(8).splitlines():
        line = raw.rstrip()
        blank = not line.strip()
        if skip_above is not None:
            if blank or indent_of(line) > skip_above:
                continue
            skip_above = None
        if literal_after is not None and not blank:
            if indent_of(line) > literal_after:
                skip_above = literal_after
                literal_after = None
                continue
            literal_after = None
        if in_options:
            if OPTION.match(line):
                continue
            in_options = False
        if in_session:
            if not blank:
                continue
            in_session = False
        if blank:
            out.append("")
            continue
        stripped = line.strip()
        directive = DIRECTIVE.match(line)
        if directive:
            name, argument = directive.group(2), directive.group(3)
            if name in DROP_BODY or name.startswith("c:"):
                skip_above = indent_of(line)
            else:
                in_options = True
                if name in VERSION_NOTES and argument:
                    out.append(f"{VERSION_NOTES[name]} {inline(argument)}.")
                elif name == "rubric" and argument:
                    out.append(inline(argument))
            continue
        if COMMENT.match(line):
            skip_above = indent_of(line)
            continue
        if ADORNMENT.match(line) or TABLE_LINE.match(line):
            continue
        if stripped.startswith(">>>"):
            in_session = True
            continue
        if stripped.endswith("::"):
            literal_after = indent_of(line)
            stripped = stripped[:-2].rstrip()
            if not stripped:
                continue
            if not raw.rstrip()[:-2].endswith(" "):
                stripped += ":"
        out.append(inline(stripped))
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def extract(deb: Path, into: Path) -> str:
    """Unpack a .deb into a directory and return its version."""
    subprocess.run(["dpkg-deb", "-x", str(deb), str(into)], check=True)
    return subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], check=True, capture_output=True,
                          text=True).stdout.strip()


def collect(root: Path) -> list[dict[str, str]]:
    """Documents (prose + source path) from the selected documentation sections, in a fixed order."""
    base = root / SOURCES_ROOT
    files: list[Path] = []
    for section in SECTIONS:
        path = base / section
        files.extend(sorted(path.rglob("*.rst.txt")) if path.is_dir() else [path])
    records = []
    for path in files:
        rel = path.relative_to(base).as_posix()
        text = rst_to_text(path.read_text(encoding="utf-8"))
        too_long = rel.startswith("library/") and len(text) > MAX_LIBRARY_CHARS
        if len(text.split()) >= MIN_WORDS and not too_long:
            records.append({"text": text, "source": f"/{SOURCES_ROOT.as_posix()}/{rel}"})
    return records


def write_jsonl_gz(records: list[dict[str, str]], path: Path) -> None:
    """Write records as gzip'd JSON lines with a fixed gzip timestamp (reproducible bytes)."""
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        gz.write(payload)


def main() -> None:
    """Download (or take) the package, convert it and write the bundled corpus."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deb", type=Path, help=f"a {PACKAGE} .deb (default: apt-get download it)")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        deb = args.deb
        if deb is None:
            subprocess.run(["apt-get", "download", PACKAGE], check=True, cwd=tmp_path)
            deb = next(tmp_path.glob(f"{PACKAGE}_*.deb"))
        version = extract(deb.resolve(), tmp_path / "root")
        records = collect(tmp_path / "root")
        args.out.mkdir(parents=True, exist_ok=True)
        write_jsonl_gz(records, args.out / "python-docs.jsonl.gz")
        shutil.copyfile(tmp_path / "root" / COPYRIGHT, args.out / "COPYRIGHT-python3.11-doc")
    chars = sum(len(r["text"]) for r in records)
    print(f"{PACKAGE} {version}: {len(records)} documents, {chars / 1e6:.2f} M characters -> {args.out}")


if __name__ == "__main__":
    main()
