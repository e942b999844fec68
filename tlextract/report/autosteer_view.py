"""What ``steer --auto`` chose and why: ``auto.json`` (everything), ``auto.md`` (the candidates
and the report table) and ``auto.png`` (effect against KL for every candidate, the bound drawn,
the choice circled; the report questions' shifts with intervals beside it)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from matplotlib.figure import Figure

from tlextract.report.figures import save_figure
from tlextract.steering.autosteer import AutoSteer
from tlextract.steering.effects import side_effect_table
from tlextract.store import write_json, write_text


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else f"{x:{spec}}"


def _snippet(text: str | None, width: int = 90) -> str:
    if text is None:
        return "-"
    flat = " ".join(text.split()).replace("|", "/")
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def autosteer_markdown(a: AutoSteer) -> str:
    lines = [
        f"# steer --auto: {a.trait} ({a.variant}) toward {a.pole}",
        "",
        f"- model `{a.model}`; effect measured by the text classifier ({a.classifier}) as the "
        f"mean probability of the {a.pole} pole; judge `{a.judge}`",
        f"- bounds: KL on neutral text <= {a.max_kl} nats/token, log-prob drop of the steered "
        f"answers <= {a.max_logprob_drop} nats/token",
        f"- chosen on {len(a.selection_questions)} questions, reported on "
        f"{len(a.report_questions)} others (95% bootstrap intervals over questions)",
        "",
    ]
    if a.chosen is None:
        lines += ["**No candidate stayed within the bounds**: loosen --max-kl / "
                  "--max-logprob-drop, or try weaker --alphas.", ""]  # fmt: skip
    else:
        c = a.chosen
        lines += [
            f"**Chosen: layer {c.layer}, alpha {c.alpha:+g}** (KL {c.kl:.3f}, log-prob drop "
            f"{_fmt(c.logprob_drop, '.2f')}, selection effect {_fmt(c.effect, '+.3f')})",
            "",
            "| condition | P(pole) | shift vs unsteered | KL | log-prob/token | judge trait | "
            "judge coherence |",
            "|---|---|---|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r.name} | {r.p_pole} | {'-' if r.shift is None else format(r.shift, '+.2f')} | "
            f"{r.kl:.3f} | {_fmt(r.logprob, '.2f')} | {_fmt(r.trait, '.1f')} | "
            f"{_fmt(r.coherence, '.1f')} |"
            for r in a.report
        ]
        lines += ["", *_effects_lines(a)]
    lines += ["## Candidates (selection questions)", "",
              "| layer | alpha | KL | log-prob drop | effect | verdict | first answer |",
              "|---:|---:|---:|---:|---:|---|---|"]  # fmt: skip
    lines += [
        f"| {c.layer} | {c.alpha:+g} | {c.kl:.3f} | {_fmt(c.logprob_drop, '.2f')} | "
        f"{_fmt(c.effect, '+.3f')} | {'**chosen**' if c == a.chosen else c.why} | "
        f"{_snippet(c.example)} |"
        for c in a.candidates
    ]
    return "\n".join(lines) + "\n"


def _effects_lines(a: AutoSteer) -> list[str]:
    """Who the setting fails and what else it moves (:mod:`tlextract.steering.effects`)."""
    shown = [r for r in a.report if r.effects is not None]
    if not shown:
        return []
    lines = [
        "## Per question: wrong way, side effects, neutral fluency",
        "",
        f"- **moved away from {a.pole}**: share of report questions whose P({a.pole}) fell below "
        "the unsteered answer's (a direction that only perturbs the text moves about half each "
        "way)",
        "- **neutral log-prob drop**: unsteered minus steered log-prob per token of the answers "
        "to neutral questions, read by the unsteered model",
        "",
        "| condition | moved away from the pole | neutral log-prob drop |",
        "|---|---|---|",
    ]
    for r in shown:
        e = r.effects
        assert e is not None
        drop = "-" if e.neutral_logprob_drop is None else format(e.neutral_logprob_drop, "+.2f")
        lines.append(f"| {r.name} | {e.wrong_way} | {drop} |")
    lines += ["", "Shift in every trait's classifier P(pos) on the same answers (bold: interval "
              "excludes zero):", ""]  # fmt: skip
    lines += side_effect_table({r.name: r.effects.side_effects for r in shown if r.effects})
    return [*lines, ""]


def plot_autosteer(a: AutoSteer, path: Path) -> Path:
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=(3, 2))
    for layer in sorted({c.layer for c in a.candidates}):
        cs = [c for c in a.candidates if c.layer == layer and c.effect is not None]
        left.plot([c.kl for c in cs], [c.effect for c in cs], "o-", label=f"L{layer}")
    left.axvline(a.max_kl, color="black", ls=":", lw=1, label="KL bound")
    if a.chosen is not None and a.chosen.effect is not None:
        left.plot(a.chosen.kl, a.chosen.effect, "o", ms=16, mfc="none", mec="black")
    left.set_xlabel("KL(steered || unsteered) on neutral text, nats/token")
    left.set_ylabel(f"shift in P({a.pole}) (selection questions)")
    left.legend(fontsize=7)
    shifted = [r for r in a.report if r.shift is not None]
    for i, r in enumerate(shifted):
        s = r.shift
        assert s is not None
        right.errorbar(i, s.value, yerr=[[s.value - s.low], [s.high - s.value]], fmt="o",
                       capsize=4)  # fmt: skip
    right.axhline(0, color="black", lw=0.8)
    right.set_xticks(range(len(shifted)), [r.name for r in shifted])
    right.set_xlim(-0.6, len(shifted) - 0.4)
    right.set_ylabel(f"shift in P({a.pole}), report questions, 95% CI")
    fig.suptitle(f"steer --auto · {a.trait} ({a.variant}) · {a.model}", fontsize=10)
    return save_figure(fig, path)


def write_autosteer(a: AutoSteer, out: Path) -> list[Path]:
    paths = [out / "auto.json", out / "auto.md", out / "auto.png"]
    write_json(paths[0], asdict(a))
    write_text(paths[1], autosteer_markdown(a))
    plot_autosteer(a, paths[2])
    return paths
