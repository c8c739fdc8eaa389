"""BENCHMARKS.md: each benchmark script REPLACES its own section, the one under its `## ` heading (appended only
when absent), so a rerun never adds a second copy.

    python benchmarks/report.py combine --heading "## GPU ..." PART.md ... [--out FILE] [--write]
        joins saved reports into one section, each part's headings one level down (what gpu.sh writes)
    python benchmarks/report.py install SECTION.md ...
        puts saved sections (e.g. gpu.sh's $OUT/gpu.md, from the GPU machine) into BENCHMARKS.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
HEADER = "# Benchmarks\n\nEvery section is written by the script named in its heading; rerun it to refresh.\n"


def write_section(body: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace the section whose `## ` heading equals body's first line (appending it when there is none; a
    heading found twice keeps only the first place)."""
    body = body.strip()
    heading = body.split("\n", 1)[0]
    if not heading.startswith("## "):
        raise ValueError(f"a section starts with its '## ' heading, not {heading[:60]!r}")
    text = path.read_text(encoding="utf-8") if path.exists() else HEADER
    lines = text.rstrip("\n").split("\n")
    starts = [i for i, line in enumerate(lines) if line.startswith("## ")]  # a section runs to the next one
    spans = [(s, e) for s, e in zip(starts, starts[1:] + [len(lines)]) if lines[s] == heading]
    if not spans:
        out = lines + [""] + body.split("\n")
    else:
        out, prev = [], 0
        for k, (s, e) in enumerate(spans):
            out += lines[prev:s] + (body.split("\n") + [""] if k == 0 else [])
            prev = e
        out += lines[prev:]
    path.write_text("\n".join(out).rstrip("\n") + "\n", encoding="utf-8")


def demote(report: str) -> str:
    """Every heading one level down (## -> ###), so a script's section can sit inside another."""
    return "\n".join("#" + line if line.startswith("##") else line for line in report.strip().split("\n"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Join or install benchmark report sections.")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("combine", help="one section from several reports, their headings one level down")
    c.add_argument("--heading", required=True, help="the section's '## ' heading")
    c.add_argument("--intro", default="", help="a paragraph under the heading")
    c.add_argument("--out", default=None, help="write the section here (default: stdout)")
    c.add_argument("--write", action="store_true", help="also replace the section in BENCHMARKS.md")
    c.add_argument("parts", nargs="+")
    i = sub.add_parser("install", help="replace (or add) saved sections in BENCHMARKS.md")
    i.add_argument("files", nargs="+")
    args = p.parse_args(argv)
    if args.cmd == "install":
        for f in args.files:
            write_section(Path(f).read_text(encoding="utf-8"))
            print(f"{f}: installed in {BENCHMARKS_MD}")
        return
    missing = [f for f in args.parts if not Path(f).is_file()]
    section = "\n\n".join([args.heading] + ([args.intro] if args.intro else [])
                          + [demote(Path(f).read_text(encoding="utf-8")) for f in args.parts if f not in missing]
                          + ([f"Not measured (no report): {', '.join(missing)}"] if missing else []))
    Path(args.out).write_text(section + "\n", encoding="utf-8") if args.out else print(section)
    if args.write:
        write_section(section)


if __name__ == "__main__":
    main()
