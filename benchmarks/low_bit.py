"""int3 and int2 weights (w3a16, w2a16) on SmolLM2-135M: group size and method, on two text domains.

    .venv/bin/python benchmarks/low_bit.py [--samples 64] [--runs w3a16:64:gptq,...] [--no-write]
        [--section NAME --title TITLE]

A run is scheme:group:method, then any further options of that method (w4a16:64:signround:--signround-steps=50);
scheme:group:auto-round:STEPS:BATCH[:SEED[:sym|asym]] runs Intel's auto-round (symmetric, or with zero points) on the
same calibration tokens in its own virtual environment (.venv-autoround, or $AUTOROUND_PYTHON; see
benchmarks/autoround.py) and scores its checkpoint with `compress eval` on both domains;
scheme:group:llm-compressor:gptq:sym[:OBSERVER] and scheme:group:llm-compressor:autoround:STEPS:BATCH run
llm-compressor 0.14 (its GPTQ, with its imatrix_mse range observer when named, or its AutoRoundModifier) in .venv-llmc
($LLMC_PYTHON; see benchmarks/llmc.py), its checkpoint scored the same way; nf4:64:bitsandbytes writes bitsandbytes'
own NF4 (transformers' BitsAndBytesConfig, round to nearest, saved before any forward pass) and scores it the same
way.

Each run is `compress quantize` (perplexity and KL divergence against the base on the built-in
held-out pages) followed by `compress eval --baseline` of the same checkpoint on a second domain
the calibration never saw: Debian's license texts (`/usr/share/common-licenses`, copied to .txt),
or Python's own LICENSE when that folder is absent. w4a16 g64 GPTQ is the reference row. The
defaults of `compress/quant/schemes.py` cite this table. Rewrites this script's section of
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from quantize_calibrated import token_files  # noqa: E402
from results import cli, write_section  # noqa: E402

RUNS = ",".join(
    [
        "w4a16:64:gptq",
        "w4a16:64:signround:--signround-steps=50:--signround-batch=4",
        "w3a16:64:rtn",
        "w3a16:64:gptq",
        "w3a16:32:gptq",
        "w2a16:32:rtn",
        "w2a16:32:gptq",
        "w2a16:16:gptq",
    ]
)
LICENSES = Path("/usr/share/common-licenses")
HERE = Path(__file__).parent
LLMC_PY = Path(os.environ.get("LLMC_PYTHON", HERE.parent / ".venv-llmc" / "bin" / "python"))
AUTOROUND_PY = Path(os.environ.get("AUTOROUND_PYTHON", HERE.parent / ".venv-autoround" / "bin" / "python"))


def second_domain(tmp: Path) -> tuple[Path, str]:
    """A folder of .txt prose that is neither Python's help pages nor technical documentation."""
    dest = tmp / "domain2"
    dest.mkdir()
    if LICENSES.is_dir():
        for f in sorted(p for p in LICENSES.iterdir() if p.is_file() and not p.is_symlink()):
            shutil.copy(f, dest / f"{f.name}.txt")
        return dest, f"Debian license texts ({LICENSES})"
    lic = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    shutil.copy(lic, dest / "LICENSE.txt")
    return dest, f"Python's LICENSE.txt ({lic})"


def change(m: dict, base: dict) -> str:
    return f"{(m['perplexity']['value'] / base['perplexity']['value'] - 1) * 100:+.1f}%"


def row(spec: str, samples: int, tmp: Path, domain2: Path) -> tuple[str, dict, dict]:
    scheme, group, method, *options = spec.split(":")
    if method == "auto-round":
        steps, batch, *rest = options
        return autoround_row(scheme, group, steps, batch, samples, tmp, domain2, *rest)
    if method == "bitsandbytes":
        return bitsandbytes_row(group, tmp, domain2)
    if method == "llm-compressor":
        return llmc_row(scheme, group, options, samples, tmp, domain2)
    out = tmp / spec.replace(":", "_").replace("=", "-")
    calib = ["--samples", str(samples)] if method != "rtn" else []
    q = cli(
        "quantize",
        "smollm2-135m",
        "-o",
        str(out),
        "--scheme",
        scheme,
        "--group-size",
        group,
        "--method",
        method,
        *calib,
        *options,
    )
    e = cli("eval", str(out), "--baseline", "smollm2-135m", "--dataset", str(domain2))
    line = table_row(scheme, group, " ".join([method, *options]), q, e, q["stages"][0]["seconds"])
    return line, q["base"], e["base"]


def autoround_row(
    scheme: str,
    group: str,
    steps: str,
    batch: str,
    samples: int,
    tmp: Path,
    domain2: Path,
    seed: str = "42",
    grid: str = "sym",
) -> tuple[str, dict, dict]:
    """seed: auto-round's own (42 by default), which orders its batches; grid: sym or asym (zero points)."""
    base, calib, _ = token_files(samples, 512, tmp)
    out, bits = tmp / f"{scheme}-{group}-auto-round-{steps}-{batch}-{seed}-{grid}", scheme[1]
    args = [str(base), str(calib), str(out), bits, group, steps, batch, seed, grid]
    r = tool_json(AUTOROUND_PY, "autoround.py", args, "auto-round")
    label = f"auto-round {steps} steps, batch {batch}" + ("" if seed == "42" else f", seed {seed}")
    label += ", zero points" if grid == "asym" else ""
    return scored_row(r["checkpoint"], scheme, group, label, r["seconds"], domain2)


def llmc_row(scheme: str, group: str, options: list[str], samples: int, tmp: Path, domain2: Path):
    """llm-compressor's GPTQ (options: sym|asym[, observer]) or AutoRoundModifier (options: autoround, steps, batch)."""
    base, calib, _ = token_files(samples, 512, tmp)
    out, bits = tmp / f"{scheme}-{group}-llmc-{'-'.join(options)}", scheme[1]
    kind, *rest = options
    args = [group, rest[0], bits, *rest[1:]] if kind == "gptq" else [bits, group, *rest]
    r = tool_json(LLMC_PY, "llmc.py", [str(base), str(calib), "-", kind, *args], "llm-compressor", LLMC_SAVE=str(out))
    return scored_row(out, scheme, group, f"llm-compressor {' '.join(options)}", r["seconds"], domain2)


def tool_json(python: Path, script: str, args: list[str], tool: str, **env: str) -> dict:
    """Another toolkit's benchmarks/`script` run in its own virtual environment -> the JSON of its last output line;
    a missing environment or a failure stops the benchmark with one line."""
    if not python.exists():
        sys.exit(f"{python} is missing: make {tool}'s virtual environment (see benchmarks/{script})")
    cmd = [str(python), str(HERE / script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1", **env})
    if proc.returncode:
        sys.exit(f"{tool} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def scored_row(
    checkpoint: str | Path, scheme: str, group: str, method: str, seconds: float, domain2: Path
) -> tuple[str, dict, dict]:
    """A checkpoint another tool wrote, scored by `compress eval --baseline` on both domains."""
    d1 = cli("eval", str(checkpoint), "--baseline", "smollm2-135m")
    d2 = cli("eval", str(checkpoint), "--baseline", "smollm2-135m", "--dataset", str(domain2))
    return table_row(scheme, group, method, d1, d2, seconds), d1["base"], d2["base"]


BNB_WRITE = """
import sys, time, torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
src, out, block = sys.argv[1], sys.argv[2], int(sys.argv[3])
start = time.perf_counter()
cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
model = AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg, dtype=torch.bfloat16)
states = [m.weight.quant_state for m in model.modules() if hasattr(getattr(m, "weight", None), "quant_state")]
assert states and all(s.blocksize == block for s in states), "bitsandbytes' block size differs from the row's"
model.save_pretrained(out)  # before any forward pass: one on a CPU with AVX512-BF16 repacks absmax (garbage reload)
AutoTokenizer.from_pretrained(src).save_pretrained(out)
print(time.perf_counter() - start)
"""


def bitsandbytes_row(group: str, tmp: Path, domain2: Path) -> tuple[str, dict, dict]:
    """bitsandbytes' own NF4 through transformers (its block size is 64 unless its config is changed)."""
    from compress.models.load import checkpoint_dir
    from compress.models.source import resolve

    out = tmp / f"nf4-{group}-bitsandbytes"
    src = checkpoint_dir(resolve("smollm2-135m"), "auto")
    proc = subprocess.run([sys.executable, "-c", BNB_WRITE, str(src), str(out), group], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"bitsandbytes failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return scored_row(out, "nf4", group, "bitsandbytes (round to nearest)", float(proc.stdout.split()[-1]), domain2)


def table_row(scheme: str, group: str, method: str, d1: dict, d2: dict, seconds: float) -> str:
    """One row from the reports on domain 1 (`quantize` or `eval --baseline`) and domain 2 (`eval --baseline`)."""
    k1, k2 = d1["result"]["divergence"], d2["result"]["divergence"]
    cells = [
        scheme,
        group,
        method,
        f"{d1['result']['perplexity']['value']:.2f} ({change(d1['result'], d1['base'])})",
        f"{k1['kl_mean']:.3f}",
        f"{k1['top1_agreement']:.1%}",
        f"{d2['result']['perplexity']['value']:.2f} ({change(d2['result'], d2['base'])})",
        f"{k2['kl_mean']:.3f}",
        f"{k2['top1_agreement']:.1%}",
        f"{d1['result']['bits_per_weight']:.2f}",
        f"{d1['result']['bytes_on_disk'] / 2**20:.1f}",
        f"{seconds:.0f}",
    ]
    line = "| " + " | ".join(cells) + " |"
    print(line, flush=True)
    return line


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--runs", default=RUNS, help="scheme:group:method[:option...], comma-separated")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--section", default="low_bit", help="the RESULTS.md section to write (another study: its own)")
    ap.add_argument("--title", default="Low-bit weights", help="that section's heading")
    args = ap.parse_args()
    for spec in args.runs.split(","):  # before the first run: a run of an hour should not stop at its second row
        if spec.split(":")[2:5] == ["llm-compressor", "gptq", "asym"]:
            sys.exit(
                f"{spec}: llm-compressor 0.14 writes zero points (compressed-tensors 0.19) that compress's "
                "transformers 5.24 and compressed-tensors 0.20 refuse to load (a size mismatch); use sym"
            )
        if spec.split(":")[2] == "auto-round" and spec.split(":")[6:] not in ([], ["sym"], ["asym"]):
            sys.exit(f"{spec}: an auto-round row ends in sym or asym")
    with tempfile.TemporaryDirectory(prefix="compress-bench-") as tmp:
        domain2, desc2 = second_domain(Path(tmp))
        rows = []
        for spec in args.runs.split(","):
            line, base1, base2 = row(spec, args.samples, Path(tmp), domain2)
            rows.append(line)
    section = "\n".join(
        [
            f"## {args.title} (`benchmarks/low_bit.py`)",
            "",
            f"SmolLM2-135M-Instruct, bfloat16 base. Calibration (every method but rtn): {args.samples} samples x 512 "
            f"tokens of the built-in calibration split. Domain 1: built-in held-out pages, "
            f"{base1['perplexity']['tokens']} tokens "
            f"(base perplexity {base1['perplexity']['value']:.2f}). Domain 2, never calibrated on: {desc2}, "
            f"{base2['perplexity']['tokens']} tokens (base {base2['perplexity']['value']:.2f}). KL: mean "
            "KL(base || result) per position; top-1: positions whose most likely next token is unchanged. Both "
            "measured on the checkpoint reloaded by plain transformers. Time: the quantize stage on 2 CPU cores.",
            "",
            "| scheme | group | method | ppl 1 (change) | KL 1 | top-1 1 | ppl 2 (change) | KL 2 | top-1 2 | "
            "bits/weight | MiB | s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    print(section)
    if not args.no_write:
        write_section(args.section, section)


if __name__ == "__main__":
    main()
