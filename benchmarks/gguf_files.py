"""GGUF files from compress against llama.cpp's own quantizer on the same model, at equal or smaller size.

    .venv/bin/python benchmarks/gguf_files.py [--threads 2] [--eval-tokens 4096] [--rounds 3] [--work DIR] [--no-write]

Needs llama-cpp-python (`pip install -e '.[llama]'`). SmolLM2-135M: the base checkpoint is exported to an f32
GGUF by `compress export`; llama.cpp's `llama_model_quantize` (the code behind `llama-quantize`, no importance
matrix: the Python binding takes none) makes its Q4_0, Q4_K_M and Q3_K_M from it. compress's files come from
`compress quantize` (GPTQ, its built-in calibration) then `compress export -f gguf`. Every file is scored by
llama.cpp itself in this process, on two texts: held-out built-in pages and license texts no calibration reads,
windows of 512: perplexity, and KL divergence / top-1 agreement against the f32 GGUF's next-token distributions
(llama.cpp's `--kl-divergence` protocol). Speed: `compress bench`'s greedy loop, rounds interleaved. Rewrites the
`gguf` section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from results import write_section  # noqa: E402

# llama.cpp's own types (ftype names of llama.h), made from the f32 GGUF
ANCHORS = ["Q4_0", "Q3_K_M", "Q4_K_M"]
# (label, quantize args, export args): compress's candidates for each size class
OURS = [
    ("compress w4a16 g32 GPTQ -> Q4_0", ["--scheme", "w4a16", "--group-size", "32", "--symmetric"], []),
    ("compress w4a16 g32 GPTQ zero points -> Q4_K/Q4_1", ["--scheme", "w4a16", "--group-size", "32"], []),
    (
        "compress w4a16 g32 GPTQ zero points -> Q4_1 (--no-k-quants)",
        None,  # the checkpoint above
        ["--no-k-quants"],
    ),
    ("compress w5a16 g32 GPTQ -> Q5_0", ["--scheme", "w5a16", "--group-size", "32"], []),
    # mixed precision at Q3_K_M's file size: 4.63 bits a weight over the linears (4, 5 or 8 bits each, all exact)
    (
        "compress mixed 4.63 bits (4/5/8) g32 GPTQ -> Q4_0/Q5_0/Q8_0",
        ["--scheme", "w4a16", "--group-size", "32", "--symmetric", "--target-bits", "4.63", "--bit-widths", "4,5,8"],
        [],
    ),
    # at Q4_0's file size: the tied table at 4 bits by GPTQ (export/tables.py) frees 14 MB for 5.56 bits a weight
    (
        "compress mixed 5.56 bits (4/5/8) g32 GPTQ, 4-bit GPTQ table -> Q4_0/Q5_0/Q8_0",
        ["--scheme", "w4a16", "--group-size", "32", "--symmetric", "--target-bits", "5.56", "--bit-widths", "4,5,8"],
        ["--embed-bits", "4"],
    ),
]


def run(*args: str) -> None:
    cmd = [sys.executable, "-m", "compress", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")


def llama_quantize(src: Path, dest: Path, ftype: str, threads: int) -> float:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = threads
    t0 = time.perf_counter()
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dest).encode(), ctypes.byref(params)):
        sys.exit(f"llama_model_quantize {ftype} failed")
    return time.perf_counter() - t0


def types_of(path: Path) -> dict[str, int]:
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for t in GGUFReader(str(path)).tensors:
        if t.name.endswith(".weight") and len(t.shape) == 2:
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def score(models: dict[str, Path], base: Path, windows: list[np.ndarray], threads: int) -> dict[str, dict]:
    """Perplexity, mean and 99th-percentile KL from the base, top-1 agreement; every model through llama.cpp."""
    import llama_cpp

    def open_(p: Path):
        n = len(windows[0])
        return llama_cpp.Llama(
            model_path=str(p), n_ctx=n, n_batch=n, n_threads=threads, n_threads_batch=threads, logits_all=True,
            verbose=False,
        )  # fmt: skip

    ref_llm = open_(base)
    llms = {label: open_(p) for label, p in models.items()}
    acc = {label: {"nll": [], "kl": [], "same": []} for label in ["base", *models]}
    for w in windows:
        ref_llm.reset()
        ref_llm.eval(w.tolist())
        ref = log_softmax(np.asarray(ref_llm.scores[: len(w) - 1], dtype=np.float32))
        acc["base"]["nll"].append(-ref[np.arange(len(w) - 1), w[1:]])
        for label, llm in llms.items():
            llm.reset()
            llm.eval(w.tolist())
            got = log_softmax(np.asarray(llm.scores[: len(w) - 1], dtype=np.float32))
            a = acc[label]
            a["nll"].append(-got[np.arange(len(w) - 1), w[1:]])
            a["kl"].append(np.maximum((np.exp(ref) * (ref - got)).sum(-1), 0))
            a["same"].append(ref.argmax(-1) == got.argmax(-1))
    for llm in [ref_llm, *llms.values()]:
        llm.close()
    out = {}
    for label, a in acc.items():
        nll = np.concatenate(a["nll"]).astype(np.float64)
        row = {"ppl": float(np.exp(nll.mean()))}
        if a["kl"]:
            kl = np.concatenate(a["kl"]).astype(np.float64)
            row |= {"kl": float(kl.mean()), "kl99": float(np.quantile(kl, 0.99)), "top1": float(np.mean(a["same"]))}
        out[label] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", type=Path, default=None, help="reuse files from an earlier run")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    from compress.runtime import llama_cpp

    if not llama_cpp.available():
        print("benchmarks/gguf_files.py needs llama-cpp-python (pip install -e '.[llama]'): nothing measured")
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="compress-bench-gguf-"))
    work.mkdir(parents=True, exist_ok=True)

    base = work / "base-gguf"
    if not base.exists():
        run("export", "smollm2-135m", "-f", "gguf", "-o", str(base))
    files: dict[str, Path] = {}
    times = work / "made.json"  # the quantizers' wall times, kept with what they made for a run that reuses it
    made: dict[str, float] = json.loads(times.read_text()) if times.is_file() else {}
    for ftype in ANCHORS:
        dest = work / f"llama-{ftype}.gguf"
        if not dest.exists():
            made[f"llama.cpp {ftype}"] = llama_quantize(base / "model.gguf", dest, ftype, args.threads)
        files[f"llama.cpp {ftype}"] = dest
    ckpt = None
    for label, qargs, eargs in OURS:
        if qargs is not None:
            ckpt = work / label.split(" -> ")[0].replace(" ", "_").replace("/", "-")
            if not ckpt.exists():
                t0 = time.perf_counter()
                run("quantize", "smollm2-135m", "-o", str(ckpt), *qargs, "--samples", str(args.samples), "--no-eval")
                made[label] = time.perf_counter() - t0
        dest = work / f"{label.replace(' ', '_').replace('/', '-').replace('>', '')}-gguf"
        if not dest.exists():
            run("export", str(ckpt), "-f", "gguf", "-o", str(dest), *eargs)
        files[label] = dest / "model.gguf"
    times.write_text(json.dumps(made))

    from transformers import AutoTokenizer

    from compress.data import text as textdata
    from compress.data.tokens import windows as token_windows
    from compress.models.load import checkpoint_dir
    from compress.models.source import resolve

    tok = AutoTokenizer.from_pretrained(checkpoint_dir(resolve("smollm2-135m"), "auto"))
    texts = {"held-out pages": textdata.builtin("evaluation"), "licenses": textdata.licenses()}
    scores = {}
    for name, t in texts.items():
        ids = token_windows(tok, t.texts, 512, args.eval_tokens).numpy()
        t0 = time.perf_counter()
        scores[name] = score(files, base / "model.gguf", list(ids), args.threads)
        print(f"{name}: {len(ids)} windows scored in {time.perf_counter() - t0:.0f} s", flush=True)
        for label, row in scores[name].items():
            print(f"  {label}: {row}", flush=True)

    from compress.eval import bench

    n_ctx = args.prompt_len + args.new_tokens + 8
    subjects = [bench.open_subject("baseline", "smollm2-135m", "torch", args.threads, "cpu", work, None, n_ctx)]
    for label, path in files.items():
        subjects.append(bench.open_subject(label, str(path), "llama.cpp", args.threads, "cpu", work, None, n_ctx))
    rows = {r.role: r for r in bench.measure(subjects, [1], args.prompt_len, args.new_tokens, args.rounds)}
    for s in subjects:
        getattr(s.decoder, "close", lambda: None)()
    env = bench.environment(args.threads, "cpu")
    import llama_cpp as binding

    (a, b) = texts
    lines = [
        "## GGUF: compress's files against llama.cpp's own quantizer (`benchmarks/gguf_files.py`)",
        "",
        f"SmolLM2-135M (tied embedding: one `token_embd` serves the output layer). llama.cpp {binding.__version__} "
        f"(llama-cpp-python) quantizes the f32 GGUF that `compress export` writes of the base checkpoint "
        "(`llama_model_quantize`, no importance matrix); compress's files: `compress quantize` (GPTQ, "
        f"{args.samples} x 512 tokens of the built-in calibration pages) then `compress export -f gguf` (embedding "
        "Q8_0 by default). All scored by llama.cpp in one process on the first "
        f"{args.eval_tokens} tokens of each text in windows of 512: **{a}** (held-out built-in help pages) and "
        f"**{b}** (license texts no calibration reads); KL divergence and top-1 agreement against the f32 GGUF. "
        f"Speed: {env['device']}, {args.threads} threads, batch 1, prompt {args.prompt_len}, {args.new_tokens} new "
        f"tokens, greedy, median of {args.rounds} interleaved rounds; x = against PyTorch {env['torch']} fp32 "
        f"({rows['baseline'].decode_tokens_per_s:.1f} decode tok/s). Size: the .gguf file in 10^6 bytes.",
        "",
        f"| file | tensor types (2-D) | size MB | ppl {a} | KL {a} | top-1 {a} | ppl {b} | KL {b} | top-1 {b} | "
        "decode x | prefill x | made in s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    pa, pb = scores[a]["base"]["ppl"], scores[b]["base"]["ppl"]
    lines.append(
        f"| f32 GGUF (base) | F32 | {(base / 'model.gguf').stat().st_size / 1e6:.1f} | {pa:.3f} | | | {pb:.3f} "
        "| | | | | |"
    )
    for label, path in files.items():
        sa, sb, r = scores[a][label], scores[b][label], rows[label]
        types = ", ".join(f"{k} x{v}" for k, v in sorted(types_of(path).items()))
        lines.append(
            f"| {label} | {types} | {path.stat().st_size / 1e6:.1f} | "
            f"{sa['ppl']:.3f} ({(sa['ppl'] / pa - 1) * 100:+.2f}%)"
            f" | {sa['kl']:.4f} | {sa['top1']:.1%} | {sb['ppl']:.3f} ({(sb['ppl'] / pb - 1) * 100:+.2f}%) | "
            f"{sb['kl']:.4f} | {sb['top1']:.1%} | {r.decode_speedup:.2f}x | {r.prefill_speedup:.2f}x | "
            + (f"{made[label]:.0f} |" if label in made else "|")
        )
    lines += [
        "",
        "llama.cpp falls back where a row is no multiple of 256 (SmolLM2's 576-wide inputs): its Q4_K_M is mostly "
        "Q5_0 and Q3_K_M mostly Q4_0 here, as the type column shows. 'made in s' is the quantizer's wall time "
        "(compress: calibration and GPTQ included; llama.cpp: round to nearest); empty when made before `made.json` "
        "was kept.",
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("gguf", body)


if __name__ == "__main__":
    main()
