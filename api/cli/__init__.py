"""``dpcompress``: admin commands (serve, migrate, keys, worker) and the users'
commands (``datasets …``, ``jobs …``), which talk to the API through api.client.

The users' commands read the API address and key from ``--api-url``/``--api-key``,
then ``DPC_API_URL``/``DPC_API_KEY``, then ``~/.config/dpcompress/config.toml``.
An error prints one line, ``error <code>: <message> (param: x)``, to stderr and
exits 1 (``DPC_DEBUG=1`` shows the traceback of an unexpected one).
"""

from __future__ import annotations

import sys

import typer

from api.cli.admin import keys_app, migrate, serve, worker
from api.cli.common import API_KEY, API_URL, connection
from api.cli.datasets import datasets_app
from api.cli.jobs import jobs_app, load_spec, print_plan

__all__ = ["app", "load_spec", "main", "print_plan"]

app = typer.Typer(help="Private model compression service", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(datasets_app, name="datasets")
app.add_typer(jobs_app, name="jobs")


@app.callback()
def _root(ctx: typer.Context, api_url: str | None = API_URL, api_key: str | None = API_KEY):
    """Private model compression: DP fine-tuning, distillation and pruning with a
    per-dataset privacy budget."""
    connection(ctx, api_url, api_key)


app.command()(serve)
app.command()(migrate)
app.command()(worker)


def main() -> None:
    sys.exit(app())
