"""`compress search` on SmolLM2-135M with a 5% perplexity budget: every candidate, the Pareto
front, the winner, the time; then the winner measured again on text of another domain (Debian's
licence texts, which neither calibration nor the search's evaluation saw).

    python benchmarks/search.py [--budget 5%] [--samples N] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from results import write_section

OTHER_PROSE = Path("/usr/share/common-licenses")
MB = 2**20


def compress(*args: str) -> dict:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-m", "compress", *args], capture_output=True, text=True, env=env)
    sys.stderr.write(proc.stderr)
    if proc.returncode not in (0, 1):
        raise SystemExit(f"compress {args[0]} failed ({proc.returncode})")
    return json.loads(proc.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", default="5%")
    ap.add_argument("--samples", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    out = a.out or Path(tempfile.mkdtemp(prefix="search-")) / "winner"
    args = ["search", "smollm2-135m", "-o", str(out), "--max-ppl-increase", a.budget, "--json", "--overwrite"]
    if a.samples:
        args += ["--samples", str(a.samples)]
    found = compress(*args)
    cands = found["candidates"]
    base = None
    lines = [
        f"`compress {' '.join(args[:2])} -o OUT {' '.join(args[4:6])}` (defaults: schemes w4a16 and w8a16, methods "
        "rtn, awq and gptq, w4a16 group sizes 128, 64 and 32; calibration on the built-in text's even-numbered "
        "help pages, perplexity on its odd-numbered ones, 8192 tokens in windows of 512). CPU, 2 threads.",
        "",
        "| # | candidate | size on disk | perplexity | change | seconds | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    if out.exists():
        base = json.loads((out / "report.json").read_text())["base"]["perplexity"]["value"]
    for i, c in enumerate(cands, 1):
        m = c["result"]
        ppl = m["perplexity"]["value"] if m else None
        change = f"{ppl / base - 1:+.2%}" if ppl is not None and base else ""
        marks = ", ".join(x for x, on in (("winner", c["winner"]), ("front", c["front"])) if on)
        verdict = c["verdict"] + (f" ({marks})" if marks else "") + (f": {c['reason']}" if c["reason"] else "")
        lines.append(
            f"| {i} | {c['label']} | {m['bytes_on_disk'] / MB:.1f} MiB | {ppl:.3f} | {change} | {c['seconds']:.0f} | "
            f"{verdict} |"
            if m
            else f"| {i} | {c['label']} | ({c['estimated_bytes'] / MB:.1f} MiB est.) | | | | {verdict} |"
        )
    lines += ["", f"Winner: {found['winner']}; the search took {found['seconds'] / 60:.1f} min."]
    if found["winner"] and OTHER_PROSE.is_dir():
        other = compress(
            "eval", str(out), "--baseline", "smollm2-135m", "--dataset", str(OTHER_PROSE), "--no-latency", "--json"
        )
        b, r = other["base"]["perplexity"]["value"], other["result"]["perplexity"]["value"]
        lines.append(
            f"On other prose ({OTHER_PROSE}, which neither calibration nor the search saw, "
            f"{other['result']['perplexity']['tokens']} tokens): base {b:.3f}, winner {r:.3f} ({r / b - 1:+.2%})."
        )
    print("\n".join(lines))
    write_section("search", "## Search (`benchmarks/search.py`)\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
