"""Read a DPO run's metrics for the failure DPO's own loss cannot see: winners getting worse.

The DPO margin grows just as well when the LoRA makes losers less likely as when it makes
winners likelier. When err_w rises above ref_w (the winners' error above the reference's), the
model satisfies the objective by degrading losers, and samples then drift with no signal left to
steer them (most pairs saturated). Both are read from the rows of metrics.jsonl (dpo/loss.py
names the columns): `winner_drift` = mean(err_w - ref_w), `saturated_frac` = share of pairs whose
sigmoid(margin) exceeds 0.99.
"""

from __future__ import annotations

# The drift must exceed this share of the reference's winner error: the very first windows
# hover around 0 with either sign, which is noise, not a trend.
RELATIVE_DRIFT = 0.01
CONSECUTIVE_WINDOWS = 2


def worsening_windows(rows: list[dict]) -> list[int]:
    """Steps of the logged windows in which winners were measurably worse than the reference."""
    return [
        int(row["step"])
        for row in rows
        if "winner_drift" in row
        and row["winner_drift"] > RELATIVE_DRIFT * max(row.get("ref_err_w", 0.0), 1e-12)
    ]


def winner_drift_warning(rows: list[dict]) -> str | None:
    """A one-line warning once winners were worse than the reference in consecutive windows."""
    steps = [int(r["step"]) for r in rows if "winner_drift" in r]
    bad = set(worsening_windows(rows))
    for k in range(len(steps) - CONSECUTIVE_WINDOWS + 1):
        run = steps[k : k + CONSECUTIVE_WINDOWS]
        if all(s in bad for s in run):
            row = next(r for r in rows if int(r["step"]) == run[-1])
            return (
                f"winners got worse than the reference (err_w - ref_w = {row['winner_drift']:.4g}, "
                f"{CONSECUTIVE_WINDOWS} logged windows in a row up to step {run[-1]}; saturated pairs "
                f"{row.get('saturated_frac', float('nan')):.0%}): the LoRA is pushing losers away rather than "
                "pulling winners closer, and samples may drift. Lower --beta or --lr, or set --dpop-lambda"
            )
    return None


def guard_summary(rows: list[dict]) -> dict:
    """What the report shows: the last window's drift and saturation, and the warning if any."""
    rows = [r for r in rows if "winner_drift" in r]
    if not rows:
        return {"winner_drift": None, "saturated_frac": None, "warning": None}
    last = rows[-1]
    return {
        "winner_drift": last["winner_drift"],
        "loser_drift": last.get("loser_drift"),
        "saturated_frac": last.get("saturated_frac"),
        "worse_windows": len(worsening_windows(rows)),
        "windows": len(rows),
        "warning": winner_drift_warning(rows),
    }
