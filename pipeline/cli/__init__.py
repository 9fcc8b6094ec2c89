"""``gpt2-pipeline``: the command line.

Each area has its own module registering its commands; heavy imports (Ray, vLLM) happen inside
commands, so ``--help`` is instant. Flags override a YAML ``--spec``; both go through
``pipeline.config``.
"""

from __future__ import annotations

import sys

import typer

from pipeline.cli import batch, doctor, jobs, k8s, serve
from pipeline.cli.common import console

app = typer.Typer(
    name="gpt2-pipeline",
    help="Run GPT-2-family models at cluster scale: bulk jobs on Ray Data, an OpenAI-compatible endpoint on Ray Serve.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
for area in (batch, serve, jobs, k8s, doctor):
    app.registered_commands += area.app.registered_commands
    app.registered_groups += area.app.registered_groups


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
    finally:
        _release_engines()


def _release_engines() -> None:
    """A command runs one job: its in-process engine gets 1 s to exit (vLLM waits 5 s, then kills
    it and says so), and the terminal keeps only our own output."""
    inline = sys.modules.get("pipeline.inline")
    if inline is not None:
        import logging

        logging.getLogger("vllm").setLevel(logging.CRITICAL + 1)  # its handler reports the kill as an error
        inline.shutdown_warm(timeout=1.0)
