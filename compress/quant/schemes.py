"""Scheme names (as the ecosystem names them) -> weight grid and compressed-tensors scheme."""

from __future__ import annotations

from dataclasses import dataclass

from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

from compress.errors import UsageError
from compress.primitives.qparams import Grid
from compress.recipe import QuantizeStage

CANDIDATE_GROUPS = (256, 128, 64, 32, 16)


@dataclass(frozen=True)
class Scheme:
    name: str
    weight: Grid
    act: str | None  # None, "int8" or "fp8": dynamic per-token activations
    group_note: str  # how the group size was chosen, for the report

    def ct_scheme(self, targets: list[str]) -> QuantizationScheme:
        g = self.weight
        weights = QuantizationArgs(
            num_bits=g.bits,
            type=g.kind,
            symmetric=g.symmetric,
            strategy="channel" if g.group_size is None else "group",
            group_size=g.group_size,
        )
        acts = None
        if self.act:
            acts = QuantizationArgs(
                num_bits=8,
                type="float" if self.act == "fp8" else "int",
                strategy="token",
                symmetric=True,
                dynamic=True,
            )
        return QuantizationScheme(targets=targets, weights=weights, input_activations=acts)

    @property
    def bits(self) -> int:
        return self.weight.bits


def fitting_groups(widths: dict[str, int]) -> list[int]:
    return [g for g in CANDIDATE_GROUPS if all(w % g == 0 for w in widths.values())]


def resolve(stage: QuantizeStage, widths: dict[str, int]) -> Scheme:
    """Build the scheme for a stage, checking the group size against every layer's input width."""
    name, gs = stage.scheme, stage.group_size
    if name in ("w8a8", "fp8"):
        if gs not in (None, "channel", "auto"):
            raise UsageError(f"{name} uses one weight scale per output channel; --group-size is for w4a16 and w8a16")
        if name == "fp8" and not stage.symmetric:
            raise UsageError("fp8 is symmetric only; drop --no-symmetric")
        kind = "float" if name == "fp8" else "int"
        return Scheme(name, Grid(8, kind, stage.symmetric, None), "int8" if name == "w8a8" else "fp8", "per channel")

    bits = 4 if name == "w4a16" else 8
    if bits == 4 and not stage.symmetric:
        raise UsageError(
            "w4a16 with --no-symmetric writes packed zero points that transformers 5 with "
            "compressed-tensors 0.20 cannot load (llm-compressor issue 1618); use symmetric"
        )
    if gs is None:
        gs = 128 if bits == 4 else "channel"
    if gs == "channel":
        return Scheme(name, Grid(bits, "int", stage.symmetric, None), None, "per channel")
    fits = fitting_groups(widths)
    if gs == "auto":
        if not fits:
            raise UsageError(f"no group size in {CANDIDATE_GROUPS} divides every layer; use --group-size channel")
        return Scheme(name, Grid(bits, "int", stage.symmetric, fits[0]), None, f"auto: {fits[0]}, the largest that divides every layer")
    bad = next((n for n, w in widths.items() if w % gs), None)
    if bad is not None:
        hint = f"sizes that fit every layer: {', '.join(map(str, fits))}" if fits else "no group size fits every layer"
        raise UsageError(
            f"group size {gs} does not divide the input width {widths[bad]} of {bad}; "
            f"{hint}, or pass --group-size auto"
        )
    return Scheme(name, Grid(bits, "int", stage.symmetric, gs), None, f"{gs} (asked)")
