"""llm-compressor's GPTQ or SparseGPT on the same model, samples and sequence length, for comparison.

Runs inside its own virtual environment (`make bench-venv` makes .venv-llmc: llm-compressor
pins its own transformers). Called by benchmarks/quantize_calibrated.py and benchmarks/prune.py:

    .venv-llmc/bin/python benchmarks/llmc.py BASE_DIR CALIB.json EVAL.json[,EVAL2.json] gptq GROUP sym|asym [BITS
        [OBSERVER]]
    .venv-llmc/bin/python benchmarks/llmc.py BASE_DIR CALIB.json EVAL.json[,EVAL2.json] autoround BITS GROUP ITERS BATCH
    .venv-llmc/bin/python benchmarks/llmc.py BASE_DIR CALIB.json EVAL.json[,EVAL2.json] sparsegpt SPARSITY unstr...|N:M

gptq: 4 bits and the min/max observer unless told (OBSERVER imatrix_mse: llm-compressor's activation-weighted range
search); autoround: llm-compressor's AutoRoundModifier (Intel's auto-round underneath), symmetric.
CALIB.json and EVAL.json hold token windows made by the caller, so both toolkits see the same
tokens; EVAL `-` scores nothing. Prints one JSON line: per evaluation file, perplexity (same windows, same protocol
as compress's report: each window scored alone, mean token NLL), KL(base || result) per position and top-1 agreement
against a copy of the base model kept before `oneshot` (compress's protocol, compress/eval/divergence.py);
`perplexity` is the first file's; oneshot seconds, peak memory during oneshot above the process before the model was
loaded. With LLMC_SAVE=DIR set, the result is also saved there compressed (compressed-tensors), for `compress eval`.
"""

import copy
import json
import math
import os
import sys
import threading
import time

import psutil
import torch
from datasets import Dataset
from llmcompressor import oneshot
from transformers import AutoModelForCausalLM, AutoTokenizer


class PeakRSS:  # the same sampler as compress.eval.memory (compress is not installed here)
    def __enter__(self):
        self.bytes, self._stop, proc = 0, threading.Event(), psutil.Process()

        def sample():
            while not self._stop.is_set():
                self.bytes = max(self.bytes, proc.memory_info().rss)
                self._stop.wait(0.01)

        self._t = threading.Thread(target=sample, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def scores(model, base, windows: torch.Tensor) -> dict:
    nll, count, kls, same = 0.0, 0, [], []
    with torch.no_grad():
        for i in range(0, len(windows), 4):
            x = windows[i : i + 4]
            logits = model(x).logits[:, :-1].float()
            ref = base(x).logits[:, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum"))
            count += x[:, 1:].numel()
            p, q = torch.log_softmax(ref, -1), torch.log_softmax(logits, -1)
            kls.append((p.exp() * (p - q)).sum(-1).clamp_min(0.0).flatten())
            same.append((ref.argmax(-1) == logits.argmax(-1)).flatten())
    kl = torch.cat(kls).double()
    return {
        "perplexity": math.exp(nll / count),
        "kl_mean": float(kl.mean()),
        "kl_p99": float(torch.quantile(kl, 0.99)),
        "top1_agreement": float(torch.cat(same).float().mean()),
    }


def weights(bits: int, group: int, sym: bool, observer: str | None = None) -> dict:
    """A config group of int weights in groups; `observer` None: compressed-tensors' default (min/max)."""
    w = {"num_bits": bits, "type": "int", "symmetric": sym, "strategy": "group", "group_size": group}
    return {"targets": ["Linear"], "weights": w if observer is None else {**w, "observer": observer}}


def modifier(method: str, args: list[str]):
    if method == "gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        group, sym = int(args[0]), args[1] == "sym"
        bits, observer = int(args[2]) if len(args) > 2 else 4, args[3] if len(args) > 3 else None
        settings = "GPTQModifier defaults (actorder static, dampening 0.01, block 128)"
        settings += f", {observer} observer" if observer else ""
        groups = {"group_0": weights(bits, group, sym, observer)}
        return GPTQModifier(config_groups=groups, ignore=["lm_head"]), settings
    if method == "autoround":
        from llmcompressor.modifiers.autoround import AutoRoundModifier

        bits, group, iters, batch = map(int, args[:4])
        return AutoRoundModifier(
            config_groups={"group_0": weights(bits, group, True)},
            ignore=["lm_head"],
            iters=iters,
            batch_size=batch,
            enable_torch_compile=False,
        ), f"AutoRoundModifier, {iters} iters, batch {batch}, symmetric, defaults otherwise"
    from llmcompressor.modifiers.pruning import SparseGPTModifier

    sparsity, pattern = float(args[0]), args[1]
    structure = "0:0" if pattern == "unstructured" else pattern
    return (
        SparseGPTModifier(sparsity=sparsity, mask_structure=structure, targets=["Linear"], ignore=["re:.*lm_head"]),
        "SparseGPTModifier defaults (dampening 0.01, block 128)",
    )


def main() -> None:
    base, calib, evalf, method = sys.argv[1:5]
    calib_ids = json.load(open(calib))
    evals = [] if evalf == "-" else [torch.tensor(json.load(open(f))) for f in evalf.split(",")]
    before = psutil.Process().memory_info().rss
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    reference = copy.deepcopy(model).eval()  # the base, for KL; made before oneshot changes the model
    ds = Dataset.from_dict({"input_ids": calib_ids, "attention_mask": [[1] * len(x) for x in calib_ids]})
    recipe, settings = modifier(method, sys.argv[5:])
    peak = PeakRSS()
    with peak:
        start = time.perf_counter()
        oneshot(
            model=model,
            dataset=ds,
            recipe=[recipe],
            max_seq_length=len(calib_ids[0]),
            num_calibration_samples=len(calib_ids),
        )
        seconds = time.perf_counter() - start
    peak = peak.bytes - before - sum(p.numel() * p.element_size() for p in reference.parameters())
    if os.environ.get("LLMC_SAVE"):
        model.save_pretrained(os.environ["LLMC_SAVE"], save_compressed=True)
        AutoTokenizer.from_pretrained(base).save_pretrained(os.environ["LLMC_SAVE"])
    domains = [scores(model.eval(), reference, ids) for ids in evals]
    print(
        json.dumps(
            {
                "perplexity": domains[0]["perplexity"] if domains else None,
                "domains": domains,
                "seconds": seconds,
                "peak_rss_above_start": peak,
                "settings": settings,
            }
        )
    )


if __name__ == "__main__":
    main()
