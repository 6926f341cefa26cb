"""The `compress` command. Each subcommand lives in its own file; this one wires them up
and turns every error into one line and an exit code (2: bad input, 1: failure, 130: Ctrl-C)."""

from __future__ import annotations

import os
import signal
import sys

# Before any library import: tqdm and transformers read these when they load.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import typer  # noqa: E402

from compress import heap
from compress.cli import bench, distill, eval as eval_cmd, export, prune, quantize, report, run, search  # noqa: E402
from compress.errors import CompressError, Terminated, printable

app = typer.Typer(
    name="compress",
    help="Make Hugging Face models smaller and faster, with a report of what was gained and lost.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("quantize")(quantize.quantize)
app.command("prune")(prune.prune)
app.command("distill")(distill.distill)
app.command("eval")(eval_cmd.evaluate)
app.command("run")(run.run)
app.command("search")(search.search_command)
app.command("report")(report.report)
app.command("export")(export.export)
app.command("bench")(bench.bench)


def _quiet_libraries() -> None:
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    # Warnings the CLI lets through (--trust-remote-code, kernel fallbacks) print as one line.
    warnings.showwarning = lambda message, *_args, **_kw: sys.stderr.write(f"warning: {message}\n")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        from loguru import logger  # compressed-tensors logs through loguru
    except ImportError:
        return
    logger.remove()
    logger.add(sys.stderr, level="ERROR")


_terminated: list[int] = []


def _terminate(signum, frame) -> None:
    # Unwinds like Ctrl-C: partial outputs and temporary directories are removed on the way out,
    # and a measurement worker is killed by subprocess.run. (click turns it into an Abort.)
    _terminated.append(signum)
    raise Terminated


def main(argv: list[str] | None = None, prog_name: str = "compress") -> None:
    _quiet_libraries()
    heap.single_arena()
    signal.signal(signal.SIGTERM, _terminate)
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name=prog_name, standalone_mode=False)
    except typer.Exit as exc:  # typer turns Ctrl-C into Exit(130)
        code = exc.exit_code
    except typer.TyperException as exc:  # bad flags or arguments
        print(f"error: {exc.format_message()}", file=sys.stderr)
        code = 2
    except Terminated:
        code = 143
    except (typer.Abort, KeyboardInterrupt):
        code = 130
    except CompressError as exc:
        print(f"error: {printable(str(exc), newlines=False)}", file=sys.stderr)
        code = exc.exit_code
    except Exception as exc:  # noqa: BLE001 - the last line of defence against tracebacks
        if os.environ.get("COMPRESS_DEBUG"):
            raise
        msg = printable(str(exc).strip().splitlines()[0]) if str(exc).strip() else ""
        print(
            f"error: unexpected {type(exc).__name__}: {msg} (set COMPRESS_DEBUG=1 for the traceback)", file=sys.stderr
        )
        code = 1
    if _terminated and code in (1, 130):
        code = 143
    if code in (130, 143):
        what = "interrupted" if code == 130 else "terminated (SIGTERM)"
        print(f"error: {what}; no output was written", file=sys.stderr)
    sys.exit(code if isinstance(code, int) else 0)
