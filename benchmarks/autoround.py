"""Intel's auto-round (SignRound) on the same model, calibration tokens, bits, group, steps and batch, for comparison.

Runs inside its own virtual environment (auto-round pins its own dependencies):

    make bench-venv  # .venv-autoround: torch 2.13.0 (constraints.txt), auto-round 0.16.1, compressed-tensors
    .venv-autoround/bin/python benchmarks/autoround.py BASE_DIR CALIB.json OUT BITS GROUP STEPS BATCH [SEED [sym|asym]]

CALIB.json holds the caller's token windows (benchmarks/quantize_calibrated.token_files), so both
toolkits see the same tokens. Writes OUT in the llm_compressor (compressed-tensors) format, which
`compress eval` scores like its own checkpoints, and prints one JSON line: the seconds of
`quantize_and_save`, the settings used and the checkpoint's folder.
"""

import json
import sys
import time
from pathlib import Path

import torch
from auto_round import AutoRound
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    base, calib, out = sys.argv[1:4]
    bits, group, steps, batch = map(int, sys.argv[4:8])
    seed = int(sys.argv[8]) if len(sys.argv) > 8 else 42  # auto-round's default; it orders the batches
    sym = (sys.argv[9] if len(sys.argv) > 9 else "sym") == "sym"  # asym: zero points
    windows = torch.tensor(json.load(open(calib)))  # [samples, seq_len]
    model = AutoModelForCausalLM.from_pretrained(base)
    tok = AutoTokenizer.from_pretrained(base)
    start = time.perf_counter()
    ar = AutoRound(
        model,
        tok,
        scheme=f"W{bits}A16",
        group_size=group,
        sym=sym,
        dataset=list(windows.split(batch)),
        iters=steps,
        nsamples=len(windows),
        seqlen=windows.shape[1],
        batch_size=batch,
        seed=seed,
    )
    ar.quantize_and_save(out, format="llm_compressor")
    seconds = time.perf_counter() - start
    saved = next(str(p.parent) for p in Path(out).rglob("config.json"))  # auto-round adds a folder of its own
    if not sym:
        # transformers 5.25 builds unpacked [O, G] zero points for an empty pack-quantized model and refuses the
        # stored packed ones as a size mismatch; `dequantize: true` makes it decompress each layer through
        # compressed-tensors while loading instead, the flag compress's own writer sets for zero points
        # (compress/formats/compressed_tensors.py, write_config). The tensors are auto-round's, untouched.
        cfg_path = Path(saved) / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["quantization_config"]["dequantize"] = True
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    n, length = windows.shape
    settings = f"auto-round defaults otherwise (lr 1/iters, best-loss params), {n} x {length}, seed {seed}, sym {sym}"
    print(json.dumps({"seconds": seconds, "settings": settings, "checkpoint": saved}))


if __name__ == "__main__":
    main()
