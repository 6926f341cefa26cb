"""Where a 4-bit tied embedding / output table costs, and what refining its most used rows buys.

SmolLM2-135M in float32, every linear untouched: only the tied table [49152, 576] changes, as the ONNX export stores
it with `--embed-bits 4` (GPTQ on the output layer's inputs, a zero point per block of 16: compress/export/tables.py),
or on the other grids the rows name (symmetric or not, block, GPTQ's dampening; 2,048 refined rows).
Each row of the table below is scored in PyTorch on the held-out built-in pages and on Debian's license texts (no
calibration reads them): perplexity, and KL divergence from the float table's distributions.

    .venv/bin/python benchmarks/table_rows.py [--eval-tokens 4096] [--threads 2]

Prints a Markdown table; writes nothing to RESULTS.md (its numbers are quoted in the export section by hand).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from compress.data import text as textdata
from compress.data.tokens import windows
from compress.eval.divergence import compare
from compress.eval.perplexity import perplexity, token_windows
from compress.export import onnx_decoder, tables
from compress.export.onnx_graph import dequantize_nbits, pack_nbits, rtn_nbits, with_refined_rows
from compress.models import source
from compress.models.load import checkpoint_dir

# the table's grid (tables.TABLE_GRID, TABLE_DAMPENING) against others: (symmetric, block, GPTQ dampening)
GRIDS = [(True, 32, 0.01), (True, 16, 0.01), (False, 16, 0.01), (False, 16, 0.1), (False, 16, 0.3), (False, 32, 0.1)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = checkpoint_dir(source.resolve("smollm2-135m"), "auto")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    weight = emb.weight.detach().clone()  # [V, K]
    t0 = time.perf_counter()
    calib = tables.output_calibration(model, tok, use=True)
    print(f"calibration statistics in {time.perf_counter() - t0:.1f} s", flush=True)

    def table(rows: torch.Tensor | None = None) -> np.ndarray:
        return dequantize_nbits(onnx_decoder.quantized_table(weight, 4, "table", calib.hessian, rows))

    four = table()
    float_ = weight.numpy()
    ids = windows(tok, textdata.builtin("calibration").texts, 512, tables.CALIBRATION_TOKENS)  # as tables reads them
    counts = torch.bincount(ids.reshape(-1), minlength=len(weight))[: len(weight)].float()

    def eight_bit(rows: torch.Tensor) -> np.ndarray:
        out = four.copy()
        out[rows.numpy()] = dequantize_nbits(rtn_nbits(float_[rows.numpy()], 8, 32))
        return out

    variants: list[tuple[str, np.ndarray, np.ndarray]] = [  # label, embedding rows, output rows
        ("float table", float_, float_),
        ("4-bit table (`--refined-rows 0`)", four, four),
        ("4-bit output layer only, float embedding", float_, four),
        ("4-bit embedding only, float output layer", four, float_),
    ]
    for n in (512, tables.REFINED_ROWS, 8192):
        t = table(tables.most_used(calib.use, n))
        default = " (default)" if n == tables.REFINED_ROWS else ""
        variants.append((f"4-bit, {n} most used rows refined{default}", t, t))
    n = tables.REFINED_ROWS
    for label, use in (("read (counts only)", counts), ("predicted (probabilities only)", calib.use - counts)):
        t = table(tables.most_used(use, n))
        variants.append((f"4-bit, {n} rows refined, ranked by how often {label}", t, t))
    t = eight_bit(tables.most_used(calib.use, n))
    variants.append((f"4-bit, {n} most used rows on 8 bits instead (round to nearest)", t, t))
    rows = tables.most_used(calib.use, 2048).numpy()
    for symmetric, block, damp in GRIDS:
        q, scale, zp = tables.calibrated(weight, calib.hessian, 4, block, torch.float16, symmetric, dampening=damp)
        t = dequantize_nbits(with_refined_rows(pack_nbits(q.numpy(), scale.float().numpy(), zp.numpy(), 4, block),
                                               float_, rows))  # fmt: skip
        zeros = "symmetric" if symmetric else "zero points"
        variants.append((f"4-bit, 2048 rows refined; {zeros}, blocks of {block}, dampening {damp}", t, t))

    texts = {"held-out pages": textdata.builtin("evaluation").texts, "license texts": textdata.licenses().texts}
    evals = {name: token_windows(tok, t, 512, args.eval_tokens) for name, t in texts.items()}
    print(f"| table | {' | '.join(f'perplexity, KL: {n}' for n in texts)} |")
    print("|---|" + "---|" * len(texts))
    for label, e_in, e_out in variants:
        emb.weight = torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(e_in)), requires_grad=False)
        head.weight = torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(e_out)), requires_grad=False)
        cells = []
        for name, w in evals.items():
            ppl = perplexity(model, w)
            kl = compare(base, model, w, name).kl_mean
            cells.append(f"{ppl:.3f}, {kl:.4f}")
        print(f"| {label} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
