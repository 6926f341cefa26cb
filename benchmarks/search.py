"""`compress search` on SmolLM2-135M with a 5% perplexity budget: every candidate, the Pareto
front, the winner, the time; then the winner measured again on text of another domain (Debian's
licence texts, which neither calibration nor the search's evaluation saw).

    python benchmarks/search.py [--budget 5%] [--samples N] [--out DIR]
    python benchmarks/search.py --table-from DIR   # the table again from a finished search's OUT/report.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from results import write_section

from compress.report.render import verdict_text
from compress.report.schema import Candidate

OTHER_PROSE = Path("/usr/share/common-licenses")
MB = 2**20


def compress(*args: str) -> dict:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-m", "compress", *args], capture_output=True, text=True, env=env)
    sys.stderr.write(proc.stderr)
    if proc.returncode not in (0, 1):
        raise SystemExit(f"compress {args[0]} failed ({proc.returncode})")
    return json.loads(proc.stdout)


def prose_folder() -> Path:
    """Debian's licence texts as .txt files (the loader reads files by extension)."""
    folder = Path(tempfile.mkdtemp(prefix="licences-"))
    for f in sorted(OTHER_PROSE.iterdir()):
        if f.is_file() and not f.is_symlink():
            shutil.copyfile(f, folder / f"{f.name}.txt")
    return folder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", default="5%")
    ap.add_argument("--samples", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--table-from", type=Path, default=None, help="a finished search's OUT: write its table only")
    a = ap.parse_args()
    out = a.table_from or a.out or Path(tempfile.mkdtemp(prefix="search-")) / "winner"
    args = ["search", "smollm2-135m", "-o", "OUT", "--max-ppl-increase", a.budget]
    if a.samples:
        args += ["--samples", str(a.samples)]
    if a.table_from is None:
        compress(*[str(out) if x == "OUT" else x for x in args], "--json", "--overwrite")
    report = json.loads((out / "report.json").read_text())
    cands, base = report["search"], report["base"]["perplexity"]["value"]
    winner = next(c["label"] for c in cands if c["winner"])
    lines = [
        f"`compress {' '.join(args)}` (defaults: schemes w4a16 and w8a16, methods rtn, awq and gptq, w4a16 group "
        "sizes 128, 64 and 32 of which 64 and 32 divide every SmolLM2 layer; 64 calibration samples of 512 tokens "
        "from the built-in text's even-numbered help pages; perplexity on its odd-numbered pages, 8192 tokens in "
        f"windows of 512; base {base:.3f}, {report['base']['bytes_on_disk'] / MB:.1f} MiB). CPU, "
        f"{report['environment']['cpu']}, {report['environment']['threads']} threads.",
        "",
        "| # | candidate | size on disk (plan) | perplexity | change | seconds (plan) | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, c in enumerate(cands, 1):
        m = c["result"]
        verdict = verdict_text(Candidate.model_validate(c))
        est = f"({c['estimated_bytes'] / MB:.1f} MiB)"
        took = (
            f"{c['seconds']:.0f} ({c['estimated_seconds']:.0f})"
            if c["seconds"]
            else f"- ({c['estimated_seconds']:.0f})"
        )
        if m:
            ppl = m["perplexity"]["value"]
            lines.append(
                f"| {i} | {c['label']} | {m['bytes_on_disk'] / MB:.1f} MiB {est} | {ppl:.3f} | {ppl / base - 1:+.2%} | "
                f"{took} | {verdict} |"
            )
        else:
            lines.append(f"| {i} | {c['label']} | {est} | | | {took} | {verdict} |")
    total = sum(c["seconds"] or 0 for c in cands)
    lines += [
        "",
        f"Winner: {winner}; the candidates' runs took {total / 60:.1f} min in all. Sizes are as planned; the plan's "
        "times are short for calibrated candidates (it counts one forward pass over the calibration tokens at the "
        "float32 matmul probe's speed; the engine's statistics, the method itself, the RTN comparison and bfloat16 "
        "matmuls are not in it).",
    ]
    if OTHER_PROSE.is_dir():
        other = compress(
            "eval", str(out), "--baseline", "smollm2-135m", "--dataset", str(prose_folder()), "--no-latency", "--json"
        )
        b, r = other["base"]["perplexity"]["value"], other["result"]["perplexity"]["value"]
        lines.append(
            f"On other prose (Debian's licence texts in {OTHER_PROSE}, which neither calibration nor the search saw, "
            f"{other['result']['perplexity']['tokens']} tokens): base {b:.3f}, winner {r:.3f} ({r / b - 1:+.2%})."
        )
    print("\n".join(lines))
    write_section("search", "## Search (`benchmarks/search.py`)\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
