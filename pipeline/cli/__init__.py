"""``gpt2-pipeline``: the command line.

Each area has its own module registering its commands; heavy imports (Ray, vLLM) happen inside
commands, so ``--help`` is instant. Flags override a YAML ``--spec``; both go through
``pipeline.config``.
"""

from __future__ import annotations

import sys

import typer

from pipeline.cli import batch, batches, doctor, jobs, k8s, serve
from pipeline.cli.common import console

app = typer.Typer(
    name="gpt2-pipeline",
    help="Run GPT-2-family models at cluster scale: bulk jobs on Ray Data, an OpenAI-compatible endpoint on Ray Serve.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
for area in (batch, serve, batches, jobs, k8s, doctor):
    app.registered_commands += area.app.registered_commands
    app.registered_groups += area.app.registered_groups


def main() -> None:
    """The console script. A finished command leaves the process at once (``_leave``): Python's
    own teardown would spend seconds collecting vLLM's and torch's objects."""
    try:
        app()
    except SystemExit as done:  # Typer ends every command this way
        code = done.code
    except KeyboardInterrupt:
        console.print("interrupted")
        code = 130
    finally:
        _release_engines()
    _leave(code)


def _release_engines() -> None:
    """A command runs one job: its in-process engine stops at once (an engine-core process
    gets 1 s to exit; vLLM would wait 5 s, then kill it and say so), and the terminal keeps only
    our own output. The heap is frozen first: vLLM's shutdown collects garbage twice, which walks
    every object of vLLM and torch (about 2 s here). An in-process engine is only stopped: its
    memory leaves with the process (``_leave`` skips the interpreter's teardown)."""
    inline = sys.modules.get("pipeline.inline")
    if inline is not None:
        import gc
        import logging

        gc.freeze()
        logging.getLogger("vllm").setLevel(logging.CRITICAL + 1)  # its handler reports the kill as an error
        inline.shutdown_warm(timeout=1.0, free=False)


def _leave(code: object) -> None:
    """Exit hooks (Ray, logging), then the streams, then the process, skipping the interpreter's
    teardown (after the freeze above, it would report vLLM's native objects as leaks)."""
    import atexit
    import os

    atexit._run_exitfuncs()
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
