"""Where MatMulNBits' accuracy level 4 (int8 activations inside the kernel) costs perplexity in an ONNX export of
SmolLM2-135M w4a16 with the 4-bit tied table: the export at level 4, then copies with one kind of matmul set back
to level 0 (float32 math), each scored by ONNX Runtime against the checkpoint in PyTorch on two texts.

    .venv/bin/python benchmarks/onnx_levels.py [--threads 2] [--eval-tokens 4096] [--work DIR]

Prints a table; writes nothing to RESULTS.md (its numbers are quoted in the export section by hand).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from export import cli  # noqa: E402

# label -> which MatMulNBits (named by their weight initializer) run at level 0; the others stay at 4
KINDS = {
    "every matmul at level 4": lambda w: False,
    "every matmul at level 0": lambda w: True,
    "output layer at 0": lambda w: "layers" not in w,
    "q/k/v at 0": lambda w: "qkv_proj" in w,
    "o_proj at 0": lambda w: "o_proj" in w,
    "gate/up at 0": lambda w: "gate_up_proj" in w,
    "down_proj at 0": lambda w: "down_proj" in w,
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--work", type=Path, default=None, help="reuse the checkpoint and export of an earlier run")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="compress-bench-levels-"))
    work.mkdir(parents=True, exist_ok=True)
    ckpt, base = work / "w4a16", work / "level4"
    if not ckpt.exists():
        q = ["--scheme", "w4a16", "--group-size", "64", "--method", "rtn", "--symmetric", "--no-eval"]
        cli("quantize", "smollm2-135m", "-o", str(ckpt), *q)  # export.py's w4a16 checkpoint
    if not base.exists():
        cli("export", str(ckpt), "-o", str(base), "--embed-bits", "4", "--accuracy-level", "4")

    import onnx
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress.data import text as textdata
    from compress.eval.perplexity import perplexity as torch_ppl, token_windows
    from compress.runtime import ort

    torch.set_num_threads(args.threads)
    dirs = {}
    for label, at_zero in KINDS.items():
        d = work / label.replace(" ", "_").replace("/", "")
        if not d.exists():
            shutil.copytree(base, d)
            m = onnx.load(str(base / "model.onnx"), load_external_data=False)  # the weights file is copied as is
            for n in m.graph.node:
                if n.op_type == "MatMulNBits":
                    level = next(a for a in n.attribute if a.name == "accuracy_level")
                    level.i = 0 if at_zero(n.input[1]) else 4
            onnx.save(m, str(d / "model.onnx"))
        dirs[label] = d
    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    decoders = {label: ort.OrtDecoder(ort.session(d / "model.onnx", args.threads)) for label, d in dirs.items()}
    texts = {"held-out pages": textdata.builtin("evaluation").texts, "license texts": textdata.licenses().texts}
    table: dict[str, list[str]] = {label: [] for label in dirs}
    refs = []
    for texts_ in texts.values():
        windows = token_windows(tok, texts_, 512, args.eval_tokens)
        ref = torch_ppl(model, windows)
        refs.append(f"{ref:.3f}")
        for label, dec in decoders.items():
            p = ort.perplexity(dec, [w.numpy() for w in windows])
            table[label].append(f"{p:.3f} ({(p / ref - 1) * 100:+.2f}%)")
    print(f"PyTorch on the checkpoint: {' / '.join(refs)} ({', '.join(texts)}; {args.eval_tokens} tokens each)")
    print(f"| ONNX export, 4-bit tied table | {' | '.join(texts)} |")
    print("|---|---|---|")
    for label, cells in table.items():
        print(f"| {label} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
