"""What rounding the activations alone costs: SmolLM2-135M with its weights untouched and every linear's inputs
(not the output layer's, as compress's schemes) rounded per token to 8 bits, fp8 (e4m3) or int8, by
compressed-tensors' own forward, the code that runs a reloaded w8a8 or fp8 checkpoint. Perplexity, KL divergence from
the base and top-1 agreement on both evaluation domains: the built-in held-out pages and the license texts.

    .venv/bin/python benchmarks/activation_floor.py [--rows float,int,float:down_proj] [--tokens 8192]

A row is a compressed-tensors activation type (`int-asym`: int8 with a zero point per token; `float/32`: a scale per
group of 32 inputs of each token instead of one per token), optionally with the linears (by name suffix, joined by +)
whose inputs stay unrounded: `float:down_proj` rounds every input but the MLP's down projection's, which says what
each kind of linear's inputs cost.

A scheme that rounds its activations this way cannot be closer to the base than this row, whatever its method does to
the weights. Prints a table; RESULTS.md quotes it by hand (section "What 8-bit activations cost alone").
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--rows", default="float,int", help="activation types, comma-separated, each with :KIND+KIND left unrounded"
    )
    ap.add_argument("--tokens", type=int, default=8192, help="tokens scored on each domain (windows of 512)")
    args = ap.parse_args()

    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress.data import text as textdata
    from compress.eval.divergence import compare
    from compress.eval.perplexity import perplexity, token_windows
    from compress.models.load import checkpoint_dir
    from compress.models.source import resolve

    torch.set_num_threads(2)
    src = checkpoint_dir(resolve("smollm2-135m"), "auto")
    tok = AutoTokenizer.from_pretrained(src)
    base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()  # compress eval's compute dtype
    texts = {"held-out pages": textdata.builtin("evaluation"), "license texts": textdata.licenses()}
    windows = {k: token_windows(tok, t.texts, 512, args.tokens) for k, t in texts.items()}
    base_ppl = {k: perplexity(base, w) for k, w in windows.items()}
    print(
        f"SmolLM2-135M, float32, {args.tokens} tokens of each domain; base perplexity "
        + ", ".join(f"{k} {v:.3f}" for k, v in base_ppl.items())
    )
    print(
        "\n| activations (per token, 8 bits) | inputs left unrounded | domain | perplexity (change) | KL | top-1 |"
        "\n|---|---|---|---|---|---|"
    )
    for row in args.rows.split(","):
        kind, _, wide = row.partition(":")
        kind, _, group = kind.partition("/")  # "float/32": a scale per group of 32 of each token's inputs
        kind, _, grid = kind.partition("-")  # "int-asym": a zero point per token
        kept = [k for k in wide.split("+") if k]
        model = copy.deepcopy(base)
        per = {"strategy": "group", "group_size": int(group)} if group else {"strategy": "token"}
        acts = QuantizationArgs(num_bits=8, type=kind, symmetric=grid != "asym", dynamic=True, **per)
        scheme = QuantizationScheme(targets=["Linear"], input_activations=acts)
        config = QuantizationConfig(
            config_groups={"group_0": scheme},
            ignore=["lm_head", *(f"re:.*{k}$" for k in kept)],
            quantization_status=QuantizationStatus.FROZEN,
        )
        apply_quantization_config(model, config)
        for domain, w in windows.items():
            ppl, d = perplexity(model, w), compare(base, model, w, domain)
            change = (ppl / base_ppl[domain] - 1) * 100
            name = ("fp8 e4m3" if kind == "float" else f"{kind}8") + (", zero point" if grid == "asym" else "")
            name += f", groups of {group}" if group else ""
            cells = [name, ", ".join(["output layer", *kept]), domain, f"{ppl:.3f} ({change:+.2f}%)"]
            print("| " + " | ".join([*cells, f"{d.kl_mean:.4f}", f"{d.top1_agreement:.1%}"]) + " |")


if __name__ == "__main__":
    main()
