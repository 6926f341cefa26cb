"""GPU latency of the torch runtime's low-bit kernels: a Llama model with Llama-3-8B shapes
(random weights; speed does not depend on them), batch 1, against bf16.

    .venv/bin/python benchmarks/gpu_kernels.py [--schemes w4a16,fp8,w8a8,2:4] [--prompt-len 2048] \
        [--new-tokens 128] [--no-write]
    .venv/bin/python benchmarks/gpu_kernels.py --tiny --device cpu --no-write   # smoke run of the same code on CPU

Each scheme's model is built from its own random bf16 weights rounded to nearest on the
scheme's grid (2:4: magnitude-pruned to 2 of every 4 inputs), its linears swapped for the
kernels of compress/runtime/torch_kernels.py;
rounds of bf16 and the scheme alternate in one process (runtime/loop.py protocol).
Rewrites the `gpu` section of benchmarks/RESULTS.md. Without a CUDA device it says so and
writes nothing.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from results import write_section  # noqa: E402

from compress.formats.stored import StoredLinear  # noqa: E402
from compress.primitives.masks import keep_n_of_m  # noqa: E402
from compress.primitives.qparams import Grid, compute_qparams, quantize  # noqa: E402
from compress.runtime import loop, torch_kernels  # noqa: E402
from compress.runtime.torch_decoder import TorchDecoder  # noqa: E402

LLAMA3_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
    rope_theta=500000.0,
)
TINY = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=1024,
    max_position_embeddings=4096,
)
SCHEMES = {  # weight grid, activations
    "w4a16": (Grid(4, "int", True, 128), None),
    "fp8": (Grid(8, "float", True, None), "fp8"),
    "w8a8": (Grid(8, "int", True, None), "int8"),
    "w8a8-asym": (Grid(8, "int", True, None), "int8-asym"),  # a zero point per token: one more int32 product a row
    "2:4": (None, None),  # bf16 weights, 2:4 sparse
}
TARGETS = {"w4a16": "decode >= 2.5x", "fp8": "decode >= 1.5x, prefill >= 1.3x", "w8a8": "", "w8a8-asym": "", "2:4": ""}


def build(config, device: str) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(config).to(torch.bfloat16).eval()


@torch.no_grad()
def to_kernels(model: torch.nn.Module, grid: Grid | None, act: str | None) -> str:
    if grid is None:  # 2:4: keep the two largest of every four inputs
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name != "lm_head":
                mod.weight.mul_(keep_n_of_m(mod.weight.abs(), 2, 4))
        return torch_kernels.use_sparse24(model)
    stored = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            w = mod.weight.float()
            scale, zp = compute_qparams(w, grid, torch.float32)
            stored[name] = StoredLinear(
                quantize(w, scale, zp, grid).cpu(), scale.cpu(), zp.cpu(), grid.bits, grid.kind, True, grid.group_size
            )
    return torch_kernels.use_kernels(model, stored, act)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--schemes", default="w4a16,fp8,w8a8,w8a8-asym,2:4")
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="small random model (smoke test)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu_kernels.py needs a CUDA GPU; none is visible, nothing measured")
        return
    from transformers import LlamaConfig

    config = LlamaConfig(**(TINY if args.tiny else LLAMA3_8B))
    base = build(config, args.device)
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt_len)).numpy()
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    rows = []
    for scheme in args.schemes.split(","):
        grid, act = SCHEMES[scheme]
        model = build(config, args.device)
        kernel = to_kernels(model, grid, act)
        gc.collect()
        decs = {"bf16": TorchDecoder(base, "torch bf16"), scheme: TorchDecoder(model, kernel)}
        for d in decs.values():
            loop.one_round(d, prompt, 8)  # warm-up
        times = {k: [] for k in decs}
        for _ in range(args.rounds):
            for k, d in decs.items():
                times[k].append(loop.one_round(d, prompt, args.new_tokens))
        b, q = loop.median(times["bf16"]), loop.median(times[scheme])
        rows.append(
            f"| {scheme} | {kernel} | {b.prefill_tokens_per_s:.0f} -> {q.prefill_tokens_per_s:.0f} "
            f"({q.prefill_tokens_per_s / b.prefill_tokens_per_s:.2f}x) | {b.decode_tokens_per_s:.1f} -> "
            f"{q.decode_tokens_per_s:.1f} ({q.decode_tokens_per_s / b.decode_tokens_per_s:.2f}x) | {TARGETS[scheme]} |"
        )
        print(rows[-1], flush=True)
        del model, decs
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    body = "\n".join(
        [
            "## GPU kernels of the torch runtime (`benchmarks/gpu_kernels.py`)",
            "",
            f"{'Tiny random Llama' if args.tiny else 'Llama with Llama-3-8B shapes, random weights'}, {name}, torch "
            f"{torch.__version__}, "
            f"batch 1, prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy with KV cache, median of "
            f"{args.rounds} "
            "rounds alternating with bf16 in one process.",
            "",
            "| scheme | kernel | prefill tok/s, bf16 -> scheme | decode tok/s, bf16 -> scheme | target |",
            "|---|---|---|---|---|",
            *rows,
        ]
    )
    print(body)
    if not args.no_write:
        write_section("gpu", body)


if __name__ == "__main__":
    main()
