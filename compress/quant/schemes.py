"""Scheme names (as the ecosystem names them) -> weight grid and activation quantization."""

from __future__ import annotations

from dataclasses import dataclass

from compress.primitives.qparams import Grid


class SchemeError(ValueError):
    """A scheme, group size or symmetry that does not fit (or not this model)."""


@dataclass(frozen=True)
class Kind:
    bits: int
    grid: str  # "int", "float" or "nf4"
    act: str | None  # None, "int8" or "fp8": dynamic per-token activations
    grouped: bool  # takes --group-size (else one scale per output channel)
    default_group: int | None  # None: per channel
    default_method: str = "rtn"  # when a recipe or command names none
    default_symmetric: bool = True


# Default method and grid of the 4- to 2-bit schemes, chosen on text the calibration never saw (benchmarks/
# RESULTS.md "Calibrated quantization", SmolLM2 w4a16 g64, 64 samples of the built-in pages; license texts): GPTQ
# with zero points +22.2% perplexity there (KL 0.289) against symmetric GPTQ's +28.5% (0.351) and RTN's +50.1%
# (0.562), for 0.06 more bits a weight. AWQ with zero points is lower still (+20.2%, 0.230) but needs a per-
# architecture adapter (it refuses BERT, Gemma, ...); GPTQ reads any linear layer. With three bits zero points
# halve GPTQ's increase there ("Asymmetric against symmetric int4": +203% -> +108%). Cost: GPTQ calibrates
# (SmolLM2: about a minute on 2 CPU cores), and transformers de-quantizes grids with zero points while loading.
LOW_BIT = {"default_method": "gptq", "default_symmetric": False}
SCHEMES: dict[str, Kind] = {
    "w4a16": Kind(4, "int", None, grouped=True, default_group=128, **LOW_BIT),
    # Fewer levels want smaller groups (benchmarks/low_bit.py, SmolLM2 GPTQ, 16 samples): int3 g32 +54.7% / +143%
    # perplexity on held-out pages / license texts against g64's +79.3% / +318%, for 0.25 more bits a weight.
    # int2 is unusable either way there (g32 +1163% / +28826%, g16 +1683% / +8685%): 32 stays, exact in GGUF Q4_0.
    "w3a16": Kind(3, "int", None, grouped=True, default_group=32, **LOW_BIT),
    "w2a16": Kind(2, "int", None, grouped=True, default_group=32, **LOW_BIT),
    # 5 and 6 bits: the widths of GGUF's Q5_0/Q5_1/Q5_K and Q6_K, which llama.cpp's own Q4_K_M/Q5_K_M mixes spend on
    # most tensors of a small model (SmolLM2's 576-wide rows are no multiple of 256: its Q4_K_M is mostly Q5_0).
    # Groups of 32 are the GGUF block; symmetric is Q5_0 exactly, zero points Q5_1.
    "w5a16": Kind(5, "int", None, grouped=True, default_group=32, default_method="gptq"),
    "w6a16": Kind(6, "int", None, grouped=True, default_group=32, default_method="gptq"),
    # bitsandbytes' NF4 (QLoRA's base format), its integers chosen by GPTQ: bitsandbytes' own writer rounds to nearest.
    # Groups are its blocks of 64 consecutive weights, float32 absmax (4.5 bits a weight), symmetric by definition.
    "nf4": Kind(4, "nf4", None, grouped=True, default_group=64, default_method="gptq"),
    "w8a16": Kind(8, "int", None, grouped=True, default_group=None),
    "w8a8": Kind(8, "int", "int8", grouped=False, default_group=None),
    # The same weights; each token's activations on [min, max] with a zero point instead of [-absmax, absmax]. With
    # the weights exact, int8 activations alone cost SmolLM2 +1.20% / +1.25% perplexity on held-out pages / license
    # texts against +2.62% / +3.61% without zero points; with SmoothQuant+RTN +0.23% / +0.65% against +0.71% /
    # +1.65% (benchmarks/RESULTS.md, "int8 activations with a zero point"). vLLM's loader takes dynamic per-token
    # int8 with or without zero points (RUNTIME_NOTES for its CPU build); w8a8 stays the ecosystem's symmetric W8A8.
    "w8a8-asym": Kind(8, "int", "int8-asym", grouped=False, default_group=None),
    "fp8": Kind(8, "float", "fp8", grouped=False, default_group=None),
}
# What a user should know about where a scheme runs, printed and kept in the report's warnings.
RUNTIME_NOTES = {
    "w8a8-asym": (
        "w8a8-asym: vLLM 0.32's CPU build loaded it and generated garbage on the AMD EPYC it was checked on (its "
        "oneDNN zero-point path; benchmarks/RESULTS.md, vLLM section); transformers, compressed-tensors and compress "
        "export run it as calibrated; for vLLM on CPU use w8a8"
    ),
}
CANDIDATE_GROUPS = (256, 128, 64, 32, 16)
NF4_GROUPS = (256, 128, 64)  # bitsandbytes' CPU and CUDA block sizes that fit a row of a small model
# Widths --target-bits chooses from: 4, 5 and 8 bits are exact GGUF blocks of 32 (Q4_0/Q5_0/Q8_0 symmetric), 3 and 6
# k-quants in groups of 16; 2 bits stay out (unusable on SmolLM2 above: +1163% perplexity on held-out pages).
MIXED_WIDTHS = (3, 4, 5, 6, 8)


@dataclass(frozen=True)
class Scheme:
    name: str
    weight: Grid
    act: str | None  # None, "int8" or "fp8": dynamic per-token activations
    group_note: str  # how the group size was chosen, for the report

    @property
    def bits(self) -> int:
        return self.weight.bits


def symmetric_for(name: str, asked: bool | None, experts: bool) -> bool:
    """The grid's symmetry: as asked, else the scheme's default; `experts` (a mixture of experts, or mixed widths)
    defaults to symmetric, as transformers cannot load their zero points (models/experts.check_loadable,
    quant/stage.py)."""
    if asked is not None:
        return asked
    return True if experts else SCHEMES[name].default_symmetric


def fitting_groups(widths) -> list[int]:
    """The candidate group sizes that divide every width (a dict of widths or an iterable)."""
    ws = list(widths.values()) if isinstance(widths, dict) else list(widths)
    return [g for g in CANDIDATE_GROUPS if all(w % g == 0 for w in ws)]


def resolve(name: str, group_size: int | str | None, symmetric: bool, widths: dict[str, int]) -> Scheme:
    """Build the scheme, checking the group size against every layer's input width."""
    kind, gs = SCHEMES[name], group_size
    if not kind.grouped:
        if gs not in (None, "channel", "auto"):
            grouped = ", ".join(n for n, k in SCHEMES.items() if k.grouped)
            raise SchemeError(f"{name} uses one weight scale per output channel; --group-size is for {grouped}")
        if kind.grid == "float" and not symmetric:
            raise SchemeError("fp8 is symmetric only; drop --no-symmetric")
        if kind.act and not symmetric:
            raise SchemeError(
                f"{name} keeps its int8 weights symmetric (vLLM's int8 kernels read no weight zero points); drop "
                "--no-symmetric (w8a8-asym puts a zero point on each token's activations)"
            )
        return Scheme(name, Grid(kind.bits, kind.grid, symmetric, None), kind.act, "per channel")
    if gs is None:
        gs = kind.default_group or "channel"
    fits = fitting_groups(widths)
    if kind.grid == "nf4":
        if not symmetric:
            raise SchemeError("nf4 is symmetric by definition (each block scaled by its absmax); drop --no-symmetric")
        fits = [g for g in fits if g in NF4_GROUPS]
        if gs == "channel" or (isinstance(gs, int) and gs not in NF4_GROUPS):
            raise SchemeError(f"nf4 blocks are bitsandbytes' sizes {', '.join(map(str, NF4_GROUPS))}; got {gs}")
    if gs == "channel":
        return Scheme(name, Grid(kind.bits, "int", symmetric, None), None, "per channel")
    if gs == "auto":
        if not fits:
            raise SchemeError(f"no group size in {CANDIDATE_GROUPS} divides every layer; use --group-size channel")
        return Scheme(
            name,
            Grid(kind.bits, kind.grid, symmetric, fits[0]),
            None,
            f"auto: {fits[0]}, the largest that divides every layer",
        )
    bad = next((n for n, w in widths.items() if w % gs), None)
    if bad is not None:
        hint = f"sizes that fit every layer: {', '.join(map(str, fits))}" if fits else "no group size fits every layer"
        raise SchemeError(
            f"group size {gs} does not divide the input width {widths[bad]} of {bad}; {hint}, or pass --group-size auto"
        )
    return Scheme(name, Grid(kind.bits, kind.grid, symmetric, gs), None, f"{gs} (asked)")


def grid_bits(grid: Grid, in_features: int | None = None) -> float:
    """Stored bits a weight: the integer, plus its group's bf16 scale (NF4: float32 absmax) and (zero points) a zero
    point packed at the weights' own width (pack-quantized). Per channel: one scale a row of `in_features` (None: not
    counted)."""
    g = grid.group_size or in_features
    scale_bits = 32 if grid.kind == "nf4" else 16
    return grid.bits + ((scale_bits + (0 if grid.symmetric else grid.bits)) / g if g else 0.0)


def bits_per_weight(name: str, group_size: int | str | None, symmetric: bool, widths) -> float:
    """Stored bits per weight of the scheme (integers plus their group's scale and zero point),
    for the plan; an impossible group size counts as per channel (the run refuses it)."""
    try:
        s = resolve(name, group_size, symmetric, {str(i): w for i, w in enumerate(widths)})
    except SchemeError:
        s = Scheme(name, Grid(SCHEMES[name].bits, SCHEMES[name].grid, symmetric=symmetric), None, "")
    return grid_bits(s.weight)
