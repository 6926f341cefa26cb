"""Nothing the user owns is lost: inputs reached through symbolic links, recipes that say
`overwrite`, and --save-recipe paths are refused before anything is written or deleted."""

import hashlib
import shutil

from tests.cli.test_errors import assert_one_line_error, compress

FAST = ("--scheme", "w8a16", "--no-eval")


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def hf_cache(src, root):
    """The Hugging Face cache layout: snapshots/<rev>/<file> -> ../../blobs/<name>."""
    blobs, snap = root / "blobs", root / "snapshots" / "rev"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in src.iterdir():
        shutil.copy(f, blobs / f"blob-{f.name}")
        (snap / f.name).symlink_to(f"../../blobs/blob-{f.name}")
    return blobs, snap


def test_overwrite_never_deletes_weights_the_input_links_to(tiny_model, tmp_path):
    blobs, snap = hf_cache(tiny_model("llama"), tmp_path / "hub")
    before = digest(blobs)
    for out in (blobs, tmp_path / "hub", snap):
        line = assert_one_line_error(compress("quantize", snap, "-o", out, "--overwrite", *FAST), 2)
        assert "the input reads" in line
    assert digest(blobs) == before


def test_output_holding_the_calibration_text_is_refused(tiny_model, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "cal.txt").write_text("some text " * 400)
    line = assert_one_line_error(
        compress(
            "quantize",
            tiny_model("llama"),
            "-o",
            data,
            "--overwrite",
            "--method",
            "gptq",
            "--dataset",
            data / "cal.txt",
            *FAST,
        ),
        2,
    )
    assert "the input reads" in line and (data / "cal.txt").is_file()


def test_a_recipe_cannot_grant_overwrite(tiny_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = tmp_path / "r.yaml"
    r.write_text(
        f"model: {tiny_model('llama')}\noutput: {out}\noverwrite: true\nstages:\n"
        "  - {stage: quantize, scheme: w8a16}\nevaluate: {enabled: false}\n"
    )
    line = assert_one_line_error(compress("run", r), 2)
    assert "--overwrite" in line and (out / "keep.txt").read_text() == "mine"
    line = assert_one_line_error(compress("run", r, "--set", "overwrite=false"), 2)  # the output exists
    assert "already exists" in line and (out / "keep.txt").read_text() == "mine"


def test_save_recipe_gets_the_outputs_protections(tiny_model, tmp_path):
    src = tiny_model("llama")
    weights = src / "model.safetensors"
    before = weights.read_bytes()
    line = assert_one_line_error(
        compress("quantize", src, "-o", tmp_path / "o", "--save-recipe", weights, "--overwrite", *FAST), 2
    )
    assert "the input reads" in line and weights.read_bytes() == before
    old = tmp_path / "old.yaml"
    old.write_text("mine")
    line = assert_one_line_error(compress("quantize", src, "-o", tmp_path / "o", "--save-recipe", old, *FAST), 2)
    assert "already exists" in line and old.read_text() == "mine"
    line = assert_one_line_error(
        compress("quantize", src, "-o", tmp_path / "o", "--save-recipe", tmp_path / "o" / "r.yaml", *FAST), 2
    )
    assert "inside the output" in line
    # a run that is refused later (its output exists) writes no recipe either
    (tmp_path / "taken").mkdir()
    new = tmp_path / "new.yaml"
    assert_one_line_error(compress("quantize", src, "-o", tmp_path / "taken", "--save-recipe", new, *FAST), 2)
    assert not new.exists()
    ok = compress("quantize", src, "-o", tmp_path / "o", "--save-recipe", new, *FAST)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "stage: quantize" in new.read_text() and not list(tmp_path.glob(".new.yaml.partial-*"))


def test_an_output_that_is_a_symbolic_link_is_refused(tiny_model, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "keep.txt").write_text("mine")
    (tmp_path / "link").symlink_to(real)
    line = assert_one_line_error(
        compress("quantize", tiny_model("llama"), "-o", tmp_path / "link", "--overwrite", *FAST), 2
    )
    assert "symbolic link" in line and (real / "keep.txt").read_text() == "mine"
