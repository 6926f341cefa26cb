"""What every method declares, whatever its stage kind: the rest of the package reads these
attributes (the recipe schema, the CLI options, the plan, the report) instead of lists of its own.

A method is one file under its stage's `methods/`, listed once in that stage's `table.py`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

# An option's `json_schema_extra` marking that the CLI passes its text to the field's own parser
# (say "3,5,7" or "2/3"), instead of a number.
CLI_TEXT = {"cli": "text"}


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Method:
    name: ClassVar[str]
    # Options of this method alone; their fields sit flat in the recipe stage and become CLI
    # options (a field's description is its help). Methods that share a field share its class.
    Options: ClassVar[type[BaseModel]] = NoOptions
    calibrated: ClassVar[bool] = True  # reads calibration text
    # `--dry-run`: working memory above the loaded model, as a multiple of the model's bytes, and
    # time as a multiple of one forward pass over the calibration tokens (benchmarks/RESULTS.md).
    working_memory: ClassVar[float] = 1.0
    time_factor: ClassVar[float] = 1.0
    threads: ClassVar[int] = 1  # groups of linears treated at once (independent groups)
    # the engine also carries the unchanged model's hidden states (`LayerInputs.reference`)
    float_stream: ClassVar[bool] = False

    def __init__(self, options: BaseModel):
        self.options = options

    def settings(self) -> dict[str, Any]:
        """What the report shows of this method's options (None reads as "searched")."""
        return {k: "searched" if v is None else v for k, v in self.options.model_dump().items()}

    @classmethod
    def time_multiple(cls, stage: Any) -> float:
        """`--dry-run`'s time for `stage` (this method's stage, with its options) as a multiple of
        one forward pass over the calibration tokens; `time_factor` unless the options change it."""
        return cls.time_factor

    @classmethod
    def check(cls, stage: BaseModel) -> None:
        """Raise ValueError when the stage's other fields do not fit this method."""
