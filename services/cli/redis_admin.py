"""`wisp-cli redis ...`: one-off administration of the Redis WISP runs on."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from redis.exceptions import ResponseError
from wisp.services.cli.common import CliError, RedisUrl, broker_url, make_settings, run_async
from wisp.services.runner import connected

redis_app = typer.Typer(help="Administer the Redis WISP runs on (as an admin user).",
                        no_args_is_help=True)


@redis_app.command("load-functions")
def load_functions(
    redis_url: RedisUrl = None,
    show: Annotated[bool, typer.Option("--show", help="Print the library instead of loading it "
                                       "(for FUNCTION LOAD by other means).")] = False,
    password_stdin: Annotated[bool, typer.Option(
        "--password-stdin", help="Read the password from the first line of stdin (over "
        "WISP_REDIS_PASSWORD and the URL's): an admin password then appears in no command line, "
        "shell history or `kubectl exec` audit record.")] = False,
) -> None:
    """Load WISP's session scripts as a Redis function library (FUNCTION LOAD; Redis >= 7).
    Needed once per Redis (functions persist in its AOF/RDB) where the drafter runs as its
    least-privilege ACL user, which may FCALL these functions but not EVAL arbitrary scripts.
    Connect as an admin: the URL's user needs FUNCTION. Loading again is harmless."""
    from wisp.bus import LIBRARY_NAME, function_library

    if show:
        print(function_library(), end="")
        return
    settings = make_settings()
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise CliError("--password-stdin: stdin held no password (pipe it in, one line)")
        settings = settings.model_copy(update={"redis_password": password})

    async def run() -> None:
        async with connected(settings, broker_url(settings, redis_url), timeout_s=5.0) as bus:
            try:
                await bus.redis.function_load(function_library(), replace=True)
            except ResponseError as err:
                raise CliError(f"FUNCTION LOAD refused: {err} (connect as an admin user; Redis "
                               ">= 7 is needed)") from None

    run_async(run())
    print(f"loaded the Redis function library {LIBRARY_NAME}")
