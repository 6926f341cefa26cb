"""genai_config.json: what ONNX Runtime GenAI (`onnxruntime-genai`) needs to run a decoder export as is.

Our graph already uses the names GenAI's own model builder writes (input_ids, attention_mask,
position_ids, past_key_values.%d.key/value -> logits, present.%d.key/value); this file names
them, the shapes GenAI allocates the cache with, the special tokens and the search defaults.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

FILE = "genai_config.json"


def _first(v):
    return v[0] if isinstance(v, list) and v else v


def config(model_config, generation: dict, filename: str) -> dict:
    """model_config: the transformers config the graph was built from; generation: generation_config.json's
    fields ({} when there is none), which override config.json's special tokens and sampling defaults."""
    c = model_config
    eos = generation.get("eos_token_id", c.eos_token_id)
    pad = _first(generation.get("pad_token_id", getattr(c, "pad_token_id", None)))
    context = int(getattr(c, "max_position_embeddings", 4096))  # the graph's rotary table holds this many
    out = {
        "model": {
            "bos_token_id": generation.get("bos_token_id", getattr(c, "bos_token_id", None)),
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
                "hidden_size": c.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": c.num_attention_heads,
                "num_hidden_layers": c.num_hidden_layers,
                "num_key_value_heads": c.num_key_value_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad if pad is not None else _first(eos),
            "type": c.model_type,
            "vocab_size": c.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": bool(generation.get("do_sample", False)),
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            # our GroupQueryAttention returns past + new as a new tensor (no cache buffer preallocated at max_length)
            "past_present_share_buffer": False,
            "repetition_penalty": float(generation.get("repetition_penalty", 1.0)),
            "temperature": float(generation.get("temperature", 1.0)),
            "top_k": int(generation.get("top_k", 50)),
            "top_p": float(generation.get("top_p", 1.0)),
        },
    }
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # GenAI reads a number or nothing, never null
        if out["model"][key] is None:
            del out["model"][key]
    return out


def write(dest: Path, model_config, checkpoint: Path, filename: str) -> None:
    gen = checkpoint / "generation_config.json"
    generation = json.loads(gen.read_text()) if gen.is_file() else {}
    (dest / FILE).write_text(json.dumps(config(model_config, generation, filename), indent=2) + "\n")


def available() -> bool:
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return False
    return True


def greedy(path: Path, ids: np.ndarray, new_tokens: int) -> np.ndarray:
    """ONNX Runtime GenAI's greedy continuation of ids [T] (new_tokens of them), read from the export directory."""
    import onnxruntime_genai as og

    model = og.Model(str(path))
    params = og.GeneratorParams(model)
    total = len(ids) + new_tokens
    params.set_search_options(max_length=total, min_length=total, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids.astype(np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    return np.asarray(gen.get_sequence(0))[len(ids) :].astype(np.int64)
