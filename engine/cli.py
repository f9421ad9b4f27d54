"""The ``crmflow`` command line: the parser, built from each command group's ``register``
(``engine/commands/``), and ``main``, which runs a command and turns the engine's expected
failures into one-line errors and exit codes."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import psycopg

from engine import capture, db, executions, workflows
from engine.commands import apikey, entities, examples, score_fit, service, workflow_admin
from engine.commands import churn as churn_commands
from engine.commands import enrollments as enrollments_commands
from engine.commands import executions as executions_commands
from engine.commands import score as score_commands
from engine.commands import suppress as suppress_commands
from engine.commands import workflow as workflow_commands
from engine.commands.common import CliError, err
from engine.model import DefinitionError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crmflow", description="A database-native workflow rules engine for CRM data."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    entities.register(sub)
    workflow_admin.register(workflow_commands.register(sub))
    enrollments_commands.register(sub)  # workflow enrollments
    executions_commands.register(sub)
    examples.register(sub)
    apikey.register(sub)
    service.register(sub)
    suppress_commands.register(sub)
    score_fit.register(score_commands.register(sub))
    churn_commands.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except (
        CliError,
        capture.CaptureError,
        db.Busy,
        workflows.WorkflowNotFound,
        workflows.ReplayRefused,
        executions.ExecutionNotFound,
    ) as exc:
        message = str(exc)
        if isinstance(exc, workflows.WorkflowNotFound):
            message = f"no workflow {exc.args[0]!r}"
        if isinstance(exc, executions.ExecutionNotFound):
            message = f"no execution {exc.args[0]!r}"
        err.print(f"[red]error[/] {message}", highlight=False)
        return 1
    except DefinitionError as exc:
        for issue in exc.issues:
            err.print(f"[red]error[/] {issue}", highlight=False)
        return 1
    except psycopg.errors.LockNotAvailable as exc:
        err.print(
            f"[red]error[/] a lock stayed taken by another session ({exc}); waits are bounded"
            " by CRMFLOW_LOCK_TIMEOUT: try again",
            highlight=False,
        )
        return 1
    except psycopg.OperationalError as exc:
        err.print(f"[red]error[/] cannot reach the database: {exc}", highlight=False)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
