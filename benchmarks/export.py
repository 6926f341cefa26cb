"""Exported SmolLM2-135M on CPU runtimes against PyTorch fp32: speed with one greedy protocol,
perplexity of the export against the compress checkpoint in PyTorch, greedy tokens, GGUF.

    .venv/bin/python benchmarks/export.py [--threads 2] [--batches 1,8] [--prompt-len 512] [--new-tokens 128]
        [--rounds 3] [--no-write]

Quantizes with `compress quantize` (round to nearest), exports with `compress export`, then
measures in this process: the PyTorch fp32 baseline and every export interleaved round by
round (compress.eval.bench, the code behind `compress bench`). Rewrites the `export`
section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from results import write_section  # noqa: E402

from compress.export.tables import REFINED_ROWS  # noqa: E402

# (label, quantize args, export args)
RTN = ["--method", "rtn", "--symmetric"]  # the export is what is measured here: the simplest grid
FLOAT_TABLES = ["--embed-bits", "0", "--lm-head-bits", "0"]
MODELS = [
    ("w4a16", ["--scheme", "w4a16", "--group-size", "64", *RTN], FLOAT_TABLES),
    ("w8a16", ["--scheme", "w8a16", *RTN], FLOAT_TABLES),
    ("w8a8", ["--scheme", "w8a8", *RTN], FLOAT_TABLES),
    ("w8a16 exact", None, ["--accuracy-level", "0", *FLOAT_TABLES]),  # same checkpoint as w8a16
    ("w4a16 + int4 output layer", None, ["--lm-head-bits", "4", "--embed-bits", "0"]),  # same checkpoint as w4a16
    # SmolLM2 ties its output layer to the embedding: one quantized table serves both; 8 bits is the default
    ("w4a16 + int8 embedding = output layer (default)", None, []),
    ("w4a16 + int4 embedding = output layer, no refined rows", None, ["--embed-bits", "4", "--refined-rows", "0"]),
    # a 4-bit table refines its most used rows (compress/export/tables.py), by default 8,192
    (
        "w4a16 + int4 embedding = output layer + 4096 rows refined",
        None,
        ["--embed-bits", "4", "--refined-rows", "4096"],
    ),
    (f"w4a16 + int4 embedding = output layer + {REFINED_ROWS} rows refined", None, ["--embed-bits", "4"]),
    # the same file with every matmul on int8 activations inside MatMulNBits (faster, not exact)
    (
        f"w4a16 + int4 embedding = output layer + {REFINED_ROWS} rows refined, level 4",
        None,
        ["--embed-bits", "4", "--accuracy-level", "4"],
    ),
]


def _cells(pairs: list[tuple[float, float]], sep: str = " / ") -> str:
    return sep.join(f"{a:.3f} -> {b:.3f} ({(b / a - 1) * 100:+.2f}%)" for a, b in pairs)


def cli(*args: str) -> str:
    cmd = [sys.executable, "-m", "compress", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed: {proc.stderr.strip().splitlines()[-1]}")
    return proc.stdout


def self_sensitivity(ckpt: Path) -> int:
    """Leading greedy tokens PyTorch keeps when the checkpoint's embeddings move by a relative
    1e-6 (float noise): how many any other runtime could be expected to match."""
    import numpy as np
    import torch

    from compress.data.text import builtin
    from compress.data.tokens import windows
    from compress.export.onnx_export import exact_reference, int8_activations
    from compress.formats.stored import read
    from compress.models.load import load
    from compress.models.source import resolve
    from compress.runtime.loop import generate
    from compress.runtime.torch_decoder import TorchDecoder

    loaded = load(resolve(str(ckpt)), dtype="float32", quantized=True)
    exact_reference(loaded, read(loaded.checkpoint), int8_activations(loaded.checkpoint))
    ids = windows(loaded.tokenizer, builtin("evaluation").texts, 64, 64)[:1].numpy()  # the export check's prompt
    clean = generate(TorchDecoder(loaded.model, ""), ids, 16)[0]
    emb = loaded.model.get_input_embeddings().weight
    torch.manual_seed(0)
    emb.data = emb.data * (1 + 1e-6 * torch.randn_like(emb))
    noisy = generate(TorchDecoder(loaded.model, ""), ids, 16)[0]
    return int(np.argmin(np.append(clean == noisy, False)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,8", help="comma-separated batch sizes, each timed against PyTorch's")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--work", type=Path, default=None, help="reuse checkpoints and exports from an earlier run")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="compress-bench-export-"))
    work.mkdir(parents=True, exist_ok=True)

    exports, checks = {}, {}
    for label, qargs, eargs in MODELS:
        base_label = label.split(" ")[0]
        ckpt = work / base_label
        if qargs is not None and not ckpt.exists():
            cli("quantize", "smollm2-135m", "-o", str(ckpt), *qargs, "--no-eval")
        dest = work / f"{label.replace(' ', '_').replace('+', 'plus')}-onnx"
        if not dest.exists():
            cli("export", str(ckpt), "-o", str(dest), *eargs, "--threads", str(args.threads))
        exports[label] = (ckpt, dest)
        checks[label] = json.loads((dest / "export.json").read_text())
    gguf_dir = work / "w8a16-gguf"
    if not gguf_dir.exists():
        cli("export", str(work / "w8a16"), "-f", "gguf", "-o", str(gguf_dir), *FLOAT_TABLES)
    gguf_info = json.loads((gguf_dir / "export.json").read_text())

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from compress.data import text as textdata
    from compress.eval import bench
    from compress.eval.perplexity import perplexity as torch_ppl, token_windows
    from compress.models.load import load
    from compress.models.source import resolve
    from compress.runtime import llama_cpp, ort

    # two domains: the held-out pages, and license texts no calibration (the 4-bit table's included) reads
    texts = {"held-out pages": textdata.builtin("evaluation").texts, "licenses": textdata.licenses().texts}
    ppl: dict[str, list[tuple[float, float]]] = {}  # label -> per text (PyTorch on the checkpoint, the export)
    from transformers import AutoModelForCausalLM

    refs: dict[tuple[Path, str], float] = {}
    windows = {}
    for label, (ckpt, dest) in exports.items():
        loaded = load(resolve(str(ckpt)), dtype="float32", quantized=True)
        dec = ort.OrtDecoder(ort.session(dest / "model.onnx", args.threads))
        ppl[label] = []
        for name, t in texts.items():
            windows[name] = token_windows(loaded.tokenizer, t, 512, args.eval_tokens)
            if (ckpt, name) not in refs:  # the checkpoint as transformers runs it (w8a8: activations per token)
                model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
                refs[ckpt, name] = torch_ppl(model, windows[name])
            ppl[label].append((refs[ckpt, name], ort.perplexity(dec, [w.numpy() for w in windows[name]])))
        del loaded, dec
        print(f"{label}: perplexity PyTorch -> ONNX Runtime {_cells(ppl[label])}", flush=True)
    gguf_ppl = None
    if llama_cpp.available():
        dec = llama_cpp.LlamaCppDecoder(gguf_dir / "model.gguf", args.threads, n_ctx=512, logits_all=True)
        gguf_ppl = []
        for i, name in enumerate(texts):
            nll = np.concatenate([-dec.logprobs(w.tolist()) for w in windows[name]])
            gguf_ppl.append((ppl["w8a16"][i][0], float(np.exp(nll.mean()))))
        dec.close()
        print(f"w8a16 GGUF: perplexity PyTorch -> llama.cpp {_cells(gguf_ppl)}", flush=True)

    sensitivity = {label: self_sensitivity(work / label) for label in ("w8a16", "w8a8")}
    print(f"PyTorch against itself, embeddings x (1 + 1e-6 noise): {sensitivity}", flush=True)

    n_ctx = args.prompt_len + args.new_tokens + 8
    subjects = [bench.open_subject("baseline", "smollm2-135m", "torch", args.threads, "cpu", work, None, n_ctx)]
    for label, (_, dest) in exports.items():
        subjects.append(bench.open_subject(label, str(dest), "onnxruntime", args.threads, "cpu", work, None, n_ctx))
    if llama_cpp.available():
        subjects.append(
            bench.open_subject("w8a16 GGUF", str(gguf_dir), "llama.cpp", args.threads, "cpu", work, None, n_ctx)
        )
    t0 = time.perf_counter()
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for batch in batches:  # llama.cpp's binding measures batch 1 only
        these = [s for s in subjects if batch == 1 or s.decoder.runtime != "llama.cpp"]
        rows += bench.measure(these, [batch], args.prompt_len, args.new_tokens, args.rounds)
    for s in subjects:
        getattr(s.decoder, "close", lambda: None)()
    env = bench.environment(args.threads, "cpu")
    print(f"measured in {time.perf_counter() - t0:.0f} s", flush=True)

    lines = [
        "## Export to ONNX Runtime and GGUF, CPU (`benchmarks/export.py`)",
        "",
        f"SmolLM2-135M, {env['device']}, {args.threads} threads, batch {args.batches}, prompt {args.prompt_len} tokens "
        "(each sequence of a batch the same), "
        f"{args.new_tokens} new tokens, greedy with KV cache, median of {args.rounds} rounds interleaved in one "
        f"process "
        f"(`compress bench` protocol). Weights: `compress quantize --method rtn` (w4a16 groups of 64, w8 per channel). "
        f"Baseline: PyTorch {torch.__version__} fp32 on the original checkpoint. Perplexity: {args.eval_tokens} "
        "tokens of each text in windows of 512 (held-out built-in pages; Debian's license texts, which no "
        "calibration reads), the export's runtime against the compress checkpoint as transformers runs it "
        "(float32; w8a8 with its per-token int8 activations).",
        "",
        "| model | runtime, kernel | batch | MB | prefill tok/s | decode tok/s | TTFT ms | prefill x | decode x | "
        "perplexity, held-out pages: PyTorch -> export | licenses: PyTorch -> export | greedy tokens equal (of 16) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.role == "baseline":
            q = "| | | |"
        elif r.role == "w8a16 GGUF":
            q = f"| {_cells(gguf_ppl, ' | ')} | |" if gguf_ppl else "| | | |"
        else:
            c = checks[r.role]["check"]
            q = f"| {_cells(ppl[r.role], ' | ')} | {c['greedy_equal']} |"
        sp = f"{r.prefill_speedup:.2f}x | {r.decode_speedup:.2f}x" if r.decode_speedup else " | "
        files = exports[r.role][1].glob("model.onnx*") if r.role in exports else gguf_dir.glob("*.gguf")
        mb = f"{sum(f.stat().st_size for f in files) / 1e6:.1f}" if r.role != "baseline" else ""
        lines.append(
            f"| {r.role} | {r.runtime}: {r.kernel} | {r.batch} | {mb} | {r.prefill_tokens_per_s:.0f} | "
            f"{r.decode_tokens_per_s:.1f} | {r.ttft_ms:.0f} | {sp} {q}"
        )
    g = gguf_info
    lines += [
        "",
        f"GGUF (`compress export w8a16 -f gguf`): {g['tensors']} tensors, {g['exact']} quantized linears carried over "
        f"exactly "
        f"as {', '.join(f'{k} x{v}' for k, v in g['types'].items())}; read back with gguf's reader: "
        f"{g['check']['verdict']} "
        f"({g['check']['tensors_compared']} weights compared).",
        "",
        f"Greedy tokens and w8a8: PyTorch itself keeps {sensitivity['w8a8']} of 16 greedy tokens (w8a16: "
        f"{sensitivity['w8a16']}) when the embeddings move by a relative 1e-6. Rounding activations to int8 per token "
        "turns float noise at rounding boundaries into whole steps (SmolLM2's outlier channels make the steps large), "
        "so no other runtime can match PyTorch token for token on w8a8; the export rounds activations per token in the "
        "graph as the checkpoint's scheme does, and its perplexity matches.",
        "",
        "Accuracy levels: MatMulNBits with `accuracy_level 0` computes in float32 on our exact weights (the greedy and "
        "perplexity columns match PyTorch); level 4 quantizes activations to int8 per block inside the kernel. 4-bit "
        "exports default to 0; 8-bit exports default to 4, because ONNX Runtime's 8-bit float32 path is slower than "
        "its float32 MatMul (row `w8a16 exact`).",
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("export", body)


if __name__ == "__main__":
    main()
