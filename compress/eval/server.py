"""A process that has imported the measuring worker and forks one child per measurement.

Run as `python -m compress.eval.server` by `measure.run_worker`, which keeps one per process. A
fresh interpreter spends ~7 s of 2 cores importing torch and transformers before every
measurement; forked from here, a child starts with those imports done and nothing else: no model,
no tensor, no thread (the server runs no torch operation), so it is as clean as a new interpreter,
and its peak memory counts the imports' share as a new interpreter's does.

Protocol, one JSON line each way: the caller writes {"args": [req, out, log], "env": {...},
"cwd": "...", "preload": [modules]}; the server imports the modules it lacks (lm-eval, ~8 s, for
task scores: once, not in every child), forks, and answers {"pid": N} once the child runs, then
{"code": exit code}. It leaves when its standard input closes (its caller is gone)."""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import traceback

from compress.eval import worker


def _child(msg: dict) -> None:
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C stops a measurement
        os.close(0)
        worker.child(*msg["args"], env=msg["env"], cwd=msg["cwd"])
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the caller, which stops the child
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    for line in sys.stdin:
        msg = json.loads(line)
        for name in msg.get("preload", []):
            try:
                importlib.import_module(name)
            except ImportError:
                pass  # the child meets the same error and reports it
        pid = os.fork()
        if pid == 0:
            replies.close()
            _child(msg)
        replies.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"code": os.waitstatus_to_exitcode(status)}) + "\n")


if __name__ == "__main__":
    main()
