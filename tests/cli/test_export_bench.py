"""`compress export` and `compress bench` through the real command: outputs, JSON, errors."""

import json

from tests.cli.test_errors import assert_one_line_error, compress, no_partials


def test_export_onnx_then_bench_side_by_side(quantized, tmp_path):
    ckpt = quantized("llama", "w4a16")
    proc = compress("export", ckpt, "-o", tmp_path / "onnx", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["nbits_layers"] == 8 + 1 and info["check"]["greedy_equal"] == 16  # + the 8-bit output layer
    assert (tmp_path / "onnx" / "model.onnx").is_file() and (tmp_path / "onnx" / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "onnx" / "export.json").read_text()) == info  # its path too, not a staging one
    assert "is an ONNX export" in assert_one_line_error(
        compress("quantize", tmp_path / "onnx", "-o", tmp_path / "q"), 2
    )

    proc = compress(
        "bench",
        tmp_path / "onnx",
        "--runtime",
        "onnxruntime",
        "--baseline",
        ckpt,
        "--batch",
        "1,2",
        "--prompt-len",
        "16",
        "--new-tokens",
        "4",
        "--rounds",
        "1",
        "--threads",
        "1",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["threads"] == 1 and res["prompt_len"] == 16 and res["device"].startswith("cpu")
    rows = {(r["role"], r["batch"]): r for r in res["rows"]}
    assert set(rows) == {("baseline", 1), ("model", 1), ("baseline", 2), ("model", 2)}
    assert rows[("model", 1)]["runtime"] == "onnxruntime" and "MatMulNBits 4-bit" in rows[("model", 1)]["kernel"]
    assert rows[("baseline", 1)]["runtime"] == "torch"
    for r in res["rows"]:
        assert r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0 and r["ttft_ms"] > 0
    assert rows[("model", 2)]["decode_speedup"] > 0 and rows[("baseline", 2)]["decode_speedup"] is None

    # the table form names runtime and kernel
    proc = compress(
        "bench",
        tmp_path / "onnx",
        "--runtime",
        "onnxruntime",
        "--prompt-len",
        "8",
        "--new-tokens",
        "2",
        "--rounds",
        "1",
    )
    assert proc.returncode == 0 and "MatMulNBits" in proc.stdout


def test_export_gguf_and_bench_on_llama_cpp(quantized, tmp_path):
    from compress.runtime import llama_cpp

    ckpt = quantized("llama", "w8a16")
    proc = compress("export", ckpt, "-f", "gguf", "-o", tmp_path / "gguf")
    assert proc.returncode == 0, proc.stderr
    assert "carried over exactly" in proc.stdout and (tmp_path / "gguf" / "model.gguf").is_file()
    assert "pass the .gguf file itself" in assert_one_line_error(compress("eval", tmp_path / "gguf"), 2)
    if llama_cpp.available():
        proc = compress(
            "bench",
            tmp_path / "gguf",
            "--runtime",
            "llama.cpp",
            "--prompt-len",
            "8",
            "--new-tokens",
            "2",
            "--rounds",
            "1",
            "--json",
        )
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["rows"][0]["runtime"] == "llama.cpp"


def test_export_bad_input(quantized, tmp_path):
    ckpt = quantized("llama", "w4a16")
    assert "--format" in assert_one_line_error(compress("export", ckpt, "-f", "tflite", "-o", tmp_path / "x"), 2)
    assert "lm-head-bits" in assert_one_line_error(
        compress("export", ckpt, "-f", "gguf", "--lm-head-bits", "6", "-o", tmp_path / "x"), 2
    )
    assert "--no-k-quants applies to --format gguf" in assert_one_line_error(
        compress("export", ckpt, "--no-k-quants", "-o", tmp_path / "x"), 2
    )
    for wide in (("-f", "gguf", "--refined-rows", "16"), ("--refined-rows", "-1")):
        assert "--refined-rows takes a count" in assert_one_line_error(
            compress("export", ckpt, *wide, "-o", tmp_path / "x"), 2
        )
    assert "--refined-rows applies to a 4-bit" in assert_one_line_error(
        compress("export", ckpt, "--refined-rows", "16", "-o", tmp_path / "x"), 2
    )  # the default tables are 8-bit
    (tmp_path / "exists").mkdir()
    assert "already exists" in assert_one_line_error(compress("export", ckpt, "-o", tmp_path / "exists"), 2)
    assert "decoders of type" in assert_one_line_error(
        compress("export", quantized("phi3", None), "-o", tmp_path / "p"), 2
    )
    assert "not found" in assert_one_line_error(compress("export", tmp_path / "nope", "-o", tmp_path / "y"), 2)
    assert "encoder" in assert_one_line_error(
        compress("export", quantized("bert", None), "--lm-head-bits", "4", "-o", tmp_path / "b"), 2
    )
    assert no_partials(tmp_path)


def test_bench_bad_input(quantized, tmp_path):
    ckpt = quantized("llama", None)
    assert "--batch" in assert_one_line_error(compress("bench", ckpt, "--batch", "one"), 2)
    assert "--runtime" in assert_one_line_error(compress("bench", ckpt, "--runtime", "tensorrt"), 2)
    assert "encoder" in assert_one_line_error(compress("bench", quantized("bert", None), "--prompt-len", "8"), 2)
    assert ".gguf" in assert_one_line_error(compress("bench", ckpt, "--runtime", "llama.cpp"), 2)
