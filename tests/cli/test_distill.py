"""`compress distill` through the real command: errors, kill + resume, sparse and quantized students."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.cli.test_errors import assert_one_line_error, compress

FAST = ["--seq-len", "32", "--batch-size", "2", "--no-latency", "--eval-tokens", "256", "--lr", "1e-3"]


def ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def mismatched(tmp_path_factory, minilm_dir):
    """A tiny causal model with another tokenizer (MiniLM's WordPiece)."""
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(minilm_dir)
    cfg = tf.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        architectures=["LlamaForCausalLM"],
    )
    dest = tmp_path_factory.mktemp("mismatched")
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


def test_vocabulary_mismatch_is_refused_before_training(tiny_model, mismatched, tmp_path):
    msg = assert_one_line_error(
        compress("distill", "--teacher", tiny_model("llama"), "--student", mismatched, "-o", tmp_path / "o"), 2
    )
    assert "vocabular" in msg and not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--steps", "0"], "steps"),
        (["--loss", "mse"], "loss"),
        (["--kd-weight", "0", "--lm-weight", "0"], "nothing to train"),
    ],
)
def test_bad_options(tiny_model, tmp_path, args, needle):
    msg = assert_one_line_error(
        compress(
            "distill", "--teacher", tiny_model("llama"), "--student", tiny_model("qwen2"), "-o", tmp_path / "o", *args
        ),
        2,
    )
    assert needle in msg


def test_text_smaller_than_one_batch(tiny_model, tmp_path):
    (tmp_path / "t.txt").write_text("a little text " * 20)  # 1-2 windows of 32 tokens, a step reads 2
    msg = assert_one_line_error(
        compress(
            "distill",
            "--teacher",
            tiny_model("llama"),
            "--student",
            tiny_model("qwen2"),
            "-o",
            tmp_path / "o",
            "--dataset",
            tmp_path / "t.txt",
            *FAST,
        ),
        2,
    )
    assert "fewer than one optimizer step" in msg


def test_unwritable_output(tiny_model, tmp_path):
    (tmp_path / "file").write_text("x")
    proc = compress(
        "distill", "--teacher", tiny_model("llama"), "--student", tiny_model("qwen2"), "-o", tmp_path / "file" / "o"
    )
    assert_one_line_error(proc, proc.returncode if proc.returncode in (1, 2) else -1)


def test_kill_then_resume_finishes_the_same_run(tiny_model, tmp_path):
    teacher, student = tiny_model("llama"), tiny_model("qwen2")
    args = [
        "--teacher",
        teacher,
        "--student",
        student,
        "--steps",
        "6",
        "--checkpoint-every",
        "2",
        "--dtype",
        "float32",
        *FAST,
    ]
    ok(compress("distill", *args, "-o", tmp_path / "straight"))

    killed = compress("distill", *args, "-o", tmp_path / "out", env={"COMPRESS_FAULT_KILL_AT_STEP": "4"})
    assert killed.returncode == -9 and not (tmp_path / "out").exists()
    partial = tmp_path / ".out.partial"
    assert (partial / "checkpoints" / "step-4" / "state.json").is_file()
    msg = assert_one_line_error(compress("distill", *args, "-o", tmp_path / "out"), 2)
    assert "--resume" in msg

    rep = json.loads(ok(compress("distill", *args, "-o", tmp_path / "out", "--resume", "--json")).stdout)
    t = rep["stages"][0]["training"]
    assert t["resumed_from"] == 4 and [r["step"] for r in t["curve"]] == [1, 2, 3, 4, 5, 6]
    assert not partial.exists() and not (tmp_path / "out" / "checkpoints").exists()
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_pruned_student_keeps_its_zeros(tiny_model, tmp_path):
    teacher = tiny_model("llama")
    ok(compress("prune", teacher, "-o", tmp_path / "sparse", "--method", "magnitude", "--sparsity", "0.5", "--no-eval"))
    rep = json.loads(
        ok(
            compress(
                "distill",
                "--teacher",
                teacher,
                "--student",
                tmp_path / "sparse",
                "-o",
                tmp_path / "out",
                "--steps",
                "4",
                *FAST,
                "--json",
            )
        ).stdout
    )
    assert rep["stages"][0]["training"]["masked_zeros"] > 0
    before, after = (
        load_file(tmp_path / "sparse" / "model.safetensors"),
        load_file(tmp_path / "out" / "model.safetensors"),
    )
    changed = 0
    for k, w in before.items():
        if k.endswith("proj.weight"):
            assert torch.equal(after[k][w == 0], torch.zeros_like(after[k][w == 0])), k
            changed += int((after[k] != w).sum())
    assert changed > 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["compress_sparsity"]["sparsity"] == pytest.approx(
        0.5, abs=0.01
    )


@pytest.mark.parametrize(
    "symmetric, mixed", [(True, False), (False, False), (True, True)], ids=["sym", "asym", "mixed"]
)
def test_quantized_student_trains_through_its_grid_and_is_saved_quantized(tiny_model, tmp_path, symmetric, mixed):
    """The student's grid (scales, and packed zero points when asymmetric; each linear's own width when mixed) is
    kept; its integers train."""
    from transformers import AutoModelForCausalLM

    from compress.formats import stored

    teacher = tiny_model("llama")
    sym = "--symmetric" if symmetric else "--no-symmetric"
    widths = ["--target-bits", "5", "--bit-widths", "4,5,8"] if mixed else []
    args = ["--scheme", "w4a16", "--group-size", "32", sym, *widths, "--no-eval"]
    ok(compress("quantize", teacher, "-o", tmp_path / "q", *args))
    rep = json.loads(
        ok(
            compress(
                "distill",
                "--teacher",
                teacher,
                "--student",
                tmp_path / "q",
                "-o",
                tmp_path / "out",
                "--steps",
                "4",
                *FAST,
                "--lr",
                "2e-2",
                "--json",
            )
        ).stdout
    )
    assert rep["stages"][0]["training"]["fake_quantized"] == 14
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] == 32
    q0, q1 = load_file(tmp_path / "q" / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert q0.keys() == q1.keys()
    scales = [k for k in q0 if k.endswith(("weight_scale", "weight_zero_point"))]
    assert scales and all(torch.equal(q0[k], q1[k]) for k in scales)  # the grid is the checkpoint's own
    assert any(k.endswith("weight_zero_point") for k in q0) is not symmetric
    assert cfg["quantization_config"].get("dequantize", False) is not symmetric  # so transformers loads zero points
    assert any(not torch.equal(q0[k], q1[k]) for k in q0 if k.endswith("weight_packed"))  # the integers moved
    before, after = stored.read(tmp_path / "q"), stored.read(tmp_path / "out")
    assert {n: w.bits for n, w in before.items()} == {n: w.bits for n, w in after.items()}
    assert (len({w.bits for w in after.values()}) > 1) is mixed
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # plain transformers reloads it
    ids = torch.randint(0, 1000, (1, 16))
    assert torch.isfinite(model(ids).logits).all()
    assert rep["result"]["perplexity"]["value"] < 1e6


def test_recipe_prune_then_distill_from_the_model_before_pruning(tiny_model, tmp_path):
    src = tiny_model("llama")
    (tmp_path / "r.yaml").write_text(f"""\
model: {src}
stages:
  - {{stage: prune, method: structured, drop_layers: [0], samples: 4, seq_len: 32}}
  - {{stage: distill, steps: 3, seq_len: 32, batch_size: 2, hidden_weight: 1.0, autocast: off}}
evaluate: {{latency: false, max_tokens: 256}}
""")
    rep = json.loads(ok(compress("run", tmp_path / "r.yaml", "-o", tmp_path / "out", "--json")).stdout)
    distill = rep["stages"][1]
    assert distill["settings"]["teacher"] == str(src) and distill["settings"]["hidden_map"] == [
        1
    ]  # the layer it came from
    t = distill["training"]
    assert t["student_perplexity_before"] > 0 and len(t["curve"]) == 3
    assert t["compute"] == "float32"  # YAML's unquoted off is the option, not false
    assert (tmp_path / "out" / "loss_curve.png").is_file() and "## Distillation" in (
        tmp_path / "out" / "report.md"
    ).read_text()


def test_gradient_checkpointing_and_bf16_autocast(tiny_model, tmp_path):
    rep = json.loads(
        ok(
            compress(
                "distill",
                "--teacher",
                tiny_model("llama"),
                "--student",
                tiny_model("qwen2"),
                "-o",
                tmp_path / "o",
                "--steps",
                "2",
                "--gradient-checkpointing",
                "--autocast",
                "bf16",
                "--hidden-weight",
                "0.5",
                "--loss",
                "jsd",
                *FAST,
                "--no-eval",
                "--json",
            )
        ).stdout
    )
    t = rep["stages"][0]["training"]
    assert len(t["curve"]) == 2 and {"kd", "hidden", "lm"} <= set(t["curve"][0])
    assert rep["stages"][0]["settings"]["gradient_checkpointing"] is True
    assert t["compute"] == "bfloat16 autocast"  # as asked, whatever the machine


def test_expert_pruned_student_trains(tiny_model, tmp_path):
    """Half the experts of a tiny MoE removed, then distilled from the model before pruning: the loss falls, the
    experts themselves were trained (their fused tensors are parameters like any weight) and the healed student is
    saved per expert with 4 of them, as transformers loads it. (A random teacher is near uniform, so how much
    distillation heals is measured on real models, not here.)"""
    src, pruned, healed = tiny_model("qwen3_moe"), tmp_path / "pruned", tmp_path / "healed"
    ok(compress("prune", src, "-o", pruned, "--method", "experts", "--experts-keep", "0.5", "--samples", "4",
                "--seq-len", "32", "--no-eval"))  # fmt: skip
    rep = json.loads(
        ok(
            compress("distill", "--student", pruned, "--teacher", src, "-o", healed, "--steps", "12", *FAST, "--json")
        ).stdout  # fmt: skip
    )
    curve = [p["loss"] for p in rep["stages"][0]["training"]["curve"]]
    assert sum(curve[-3:]) < sum(curve[:3]), curve
    before, after = load_file(pruned / "model.safetensors"), load_file(healed / "model.safetensors")
    experts = [k for k in after if ".experts." in k]
    assert len(experts) == 2 * 4 * 3 and set(experts) == {k for k in before if ".experts." in k}
    assert all(not torch.equal(before[k], after[k]) for k in experts)


def test_quantized_moe_student_stays_quantized(quantized, tiny_model, tmp_path):
    """A quantized mixture of experts distils through every expert's grid and is saved with every expert quantized
    again (transformers loads its experts de-quantized and fused; they are unfused to match their grids)."""
    out = tmp_path / "out"
    student = quantized("qwen3_moe", "w4a16", group_size=32)
    rep = json.loads(
        ok(
            compress(
                "distill",
                "--student",
                student,
                "--teacher",
                tiny_model("qwen3_moe"),
                "-o",
                out,
                "--steps",
                "2",
                *FAST,
                "--json",
            )
        ).stdout  # fmt: skip
    )
    assert rep["stages"][0]["training"]["fake_quantized"] == 2 * (4 + 8 * 3)  # q/k/v/o and 8 experts x 3, 2 layers
    stored = load_file(out / "model.safetensors")
    assert sum(k.endswith(".weight_packed") and ".experts." in k for k in stored) == 2 * 8 * 3
    assert not any(k.endswith(".weight") and ".experts." in k for k in stored)
