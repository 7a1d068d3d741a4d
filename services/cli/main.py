"""wisp-cli: run WISP's services, submit prompts, inspect the streams, prepare models, measure.

This module only assembles the command groups into one app and turns errors into one line on
stderr with a non-zero exit (2 for bad usage, 1 for a failed operation); the commands live in
their groups' modules.
"""

from __future__ import annotations

import sys

import typer
from typer._click import exceptions as click_exc  # typer vendors click; its errors live here
from wisp.services.cli import (
    bench,
    controller,
    drafter,
    estimator,
    peers,
    prepare,
    redis_admin,
    sim,
    system,
)
from wisp.services.cli.common import CliError

app = typer.Typer(
    name="wisp-cli",
    help="WISP: distributed speculative LLM serving. Edge drafters propose tokens, GPU verifiers "
    "check them in SLO-aware batches; services talk over Redis streams.\n\n"
    "Quick start: `wisp-cli demo`, or `wisp-cli up` in one terminal and `wisp-cli submit "
    "\"PROMPT\"` in another.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
app.add_typer(system.app)
app.add_typer(prepare.models_app, name="models")
app.add_typer(prepare.app)
app.add_typer(bench.app)
app.add_typer(peers.app)
app.add_typer(controller.trace_app, name="trace")
app.add_typer(controller.controller_app, name="controller")
app.add_typer(drafter.drafter_app, name="drafter")
app.add_typer(estimator.profile_app, name="profile")
app.add_typer(estimator.estimator_app, name="estimator")
app.add_typer(sim.sim_app, name="sim")
app.add_typer(redis_admin.redis_app, name="redis")


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; usage errors and failures become one line on stderr."""
    try:
        app(args=argv, standalone_mode=False)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        print("wisp-cli: aborted", file=sys.stderr)
        sys.exit(130)
    except click_exc.NoArgsIsHelpError as err:
        if err.ctx is not None:
            print(err.ctx.get_help())
        sys.exit(0)
    except click_exc.UsageError as err:
        hint = f" (see `{err.ctx.command_path} --help`)" if err.ctx else ""
        print(f"wisp-cli: error: {err.format_message()}{hint}", file=sys.stderr)
        sys.exit(2)
    except CliError as err:
        print(f"wisp-cli: error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
