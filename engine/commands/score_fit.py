"""`crmflow score fit NAME --outcome COLUMN --horizon 90d [--as-of DATE] [--save]`: learn a
scorecard's weights from history (engine/scorecards/fit.py), print the held-out quality,
save a new version only with --save."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import psycopg
from rich.table import Table

from engine.commands.common import CliError, console, dump_json, duration_arg, with_conn


def register(score: Any) -> None:
    """Add `fit` to the `score` subcommands."""
    p = score.add_parser(
        "fit",
        help="learn a scorecard's weights from history (logistic + survival), report quality",
        description=(
            "Fits a logistic model of 'the outcome happens within the horizon' (one per"
            " segment) and a Weibull survival model of the days until it, on the scorecard's"
            " own features as of past dates; prints held-out AUC, Brier score, a"
            " reliability table and factor importance next to the current version's; with"
            " --save stores the fitted weights as a new version. Needs the 'fit' extra"
            " (scikit-learn, lifelines)."
        ),
    )
    p.add_argument("name", help="scorecard name")
    p.add_argument(
        "--outcome", required=True, help="a date/timestamp column of the entity (churned_at)"
    )
    p.add_argument("--horizon", type=duration_arg, default=90 * 86400.0, help="e.g. 90d (90d)")
    p.add_argument(
        "--as-of", dest="as_of", help="the latest snapshot date (default: now minus the horizon)"
    )
    p.add_argument(
        "--snapshots",
        type=int,
        default=3,
        help="snapshots one horizon apart, back from --as-of (3)",
    )
    p.add_argument("--holdout", type=float, default=0.3, help="held-out share of entities (0.3)")
    p.add_argument("--seed", type=int, default=17, help="seed of the held-out split (17)")
    p.add_argument("--save", action="store_true", help="save the fitted weights as a new version")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_score_fit)


def _f(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_fit(result: Any) -> None:
    """The fit's report (also used by `crmflow demo`)."""
    console.print(
        f"[bold]{result.scorecard}[/] v{result.version}: {len(result.y):,} rows"
        f" ({int(result.y.sum()):,} churned within {result.horizon_days}d) from"
        f" {max(result.snapshot) + 1} snapshot(s) up to {result.as_of:%Y-%m-%d};"
        f" held out {int(result.held_out.sum()):,} rows by entity"
        + (f"; {result.feedback_labels} false-positive label(s)" if result.feedback_labels else ""),
        highlight=False,
    )
    q = Table(title="Held-out quality", title_justify="left")
    for c in (
        "segment",
        "rows",
        "positives",
        "AUC fitted",
        "AUC current",
        "Brier fitted",
        "Brier current",
    ):
        q.add_column(c, justify="left" if c == "segment" else "right")
    q.add_row(
        "all",
        str(result.fitted.rows),
        str(result.fitted.positives),
        _f(result.fitted.auc),
        _f(result.baseline.auc),
        _f(result.fitted.brier, 4),
        _f(result.baseline.brier, 4),
    )
    for name, fq in result.fitted_by_segment.items():
        bq = result.baseline_by_segment[name]
        own = "" if result.model_for(name).own else " (shared model)"
        q.add_row(
            name + own, str(fq.rows), str(fq.positives), _f(fq.auc), _f(bq.auc),
            _f(fq.brier, 4), _f(bq.brier, 4),
        )  # fmt: skip
    console.print(q)
    r = Table(title="Reliability (held out, by decile of the prediction)", title_justify="left")
    for c in ("predicted range", "rows", "mean predicted", "observed"):
        r.add_column(c, justify="right")
    for b in result.reliability:
        r.add_row(
            f"{b['from']:.3f}-{b['to']:.3f}", str(b["rows"]), f"{b['predicted']:.3f}",
            f"{b['observed']:.3f}",
        )  # fmt: skip
    console.print(r)
    imp = Table(title="Factor importance", title_justify="left")
    for c in ("factor", "weight", "per SD (log-odds)", "odds ratio / SD", "AUC lost if shuffled"):
        imp.add_column(c, justify="left" if c == "factor" else "right")
    top = result.models["default"]
    for i in result.importance:
        imp.add_row(
            i["label"], f"{top.weights[i['id']]:+.4f}", f"{i['std_coefficient']:+.3f}",
            f"{i['odds_ratio_per_sd']:.2f}", _f(i["auc_drop"]),
        )  # fmt: skip
    console.print(imp)
    sq = result.survival_quality or {}
    if result.survival is not None:
        console.print(
            f"survival (Weibull AFT): shape {result.survival['shape']:.3f}, held-out"
            f" concordance {_f(sq.get('concordance'))}, median days to churn"
            f" {_f(sq.get('median_days'), 0)} (churners: {_f(sq.get('median_days_positives'), 0)})",
            highlight=False,
        )
    elif sq.get("error"):
        console.print(f"survival model not fitted: {sq['error']}", highlight=False)


def summary(result: Any) -> dict[str, Any]:
    def q(x: Any) -> dict[str, Any]:
        return {"auc": x.auc, "brier": x.brier, "rows": x.rows, "positives": x.positives}

    return {
        "scorecard": result.scorecard,
        "version": result.version,
        "as_of": result.as_of.isoformat(),
        "horizon_days": result.horizon_days,
        "rows": len(result.y),
        "held_out": int(result.held_out.sum()),
        "fitted": q(result.fitted),
        "current": q(result.baseline),
        "segments": {
            n: {"fitted": q(f), "current": q(result.baseline_by_segment[n])}
            for n, f in result.fitted_by_segment.items()
        },
        "reliability": result.reliability,
        "importance": result.importance,
        "survival": result.survival,
        "survival_quality": result.survival_quality,
        "feedback_labels": result.feedback_labels,
        "definition": result.fitted_definition(),
    }


def cmd_score_fit(args: argparse.Namespace) -> int:
    from engine.scorecards import fit as fitting
    from engine.scorecards.model import ScorecardError
    from engine.scorecards.store import ScorecardNotFound

    try:
        as_of = fitting.parse_as_of(args.as_of) if args.as_of else None
    except ValueError as exc:
        raise CliError(f"--as-of: {exc}") from None
    if not 0.05 <= args.holdout <= 0.8:
        raise CliError("--holdout: a share between 0.05 and 0.8")
    horizon_days = round(args.horizon / 86400)
    if horizon_days < 1:
        raise CliError("--horizon: at least one day")

    async def run(conn: psycopg.AsyncConnection[Any]) -> int:
        try:
            with console.status("fitting"):
                result = await fitting.fit(
                    conn,
                    args.name,
                    args.outcome,
                    horizon_days,
                    as_of,
                    holdout=args.holdout,
                    seed=args.seed,
                    snapshots=args.snapshots,
                )
        except ScorecardNotFound:
            raise CliError(f"no scorecard named {args.name!r} (crmflow score list)") from None
        except (fitting.FitError, ScorecardError) as exc:
            raise CliError(str(exc)) from None
        saved = await fitting.save(conn, result) if args.save else None
        if args.json:
            out = summary(result)
            out["saved_version"] = saved.version if saved else None
            dump_json(out)
            return 0
        print_fit(result)
        if saved is not None:
            console.print(
                f"saved [bold]{saved.name}[/] v{saved.version} with the fitted weights",
                highlight=False,
            )
        else:
            console.print("not saved (--save stores the fitted weights as a new version)")
        return 0

    return asyncio.run(with_conn(run))
