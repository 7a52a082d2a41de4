"""The RL run's report: PNG plots and report.md from OUT/metrics.jsonl.

    from glm5.rl.report import write_rl_report, plot_rl
    write_rl_report("runs/rl", config)          # -> runs/rl/report.md, runs/rl/plots/rl_*.png

Plots: reward (mean, and the share of exact successes), response length, staleness (mean / max), the
engine/trainer mismatch KL, rollout and training throughput.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from glm5.train.report import read_metrics

PLOTS = [
    ("rl_reward.png", "Reward", [("reward_mean", "mean reward"), ("exact_share", "share with reward >= 1")]),
    ("rl_response_length.png", "Response length (sampled tokens)", [("response_len_mean", "mean")]),
    ("rl_staleness.png", "Staleness (policy versions)", [("staleness_mean", "mean"), ("staleness_max", "max")]),
    ("rl_mismatch.png", "Engine vs trainer log-probs: KL", [("mismatch_kl", "mismatch KL (k3)")]),
    ("rl_throughput.png", "Throughput (tokens/s)", [("rollout_tokens_per_s", "rollout"),
                                                    ("train_tokens_per_s", "training")]),
]


def plot_rl(records: list[dict], plot_dir: Path, prefix: str = "") -> list[tuple[str, str]]:
    """-> [(title, file name)] of the plots written under plot_dir."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    written = []
    steps = [r["step"] for r in records]
    for name, title, series in PLOTS:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for key, label in series:
            values = [r.get(key) if r.get(key) is not None else float("nan") for r in records]
            ax.plot(steps, values, marker="." if len(steps) < 40 else None, label=label)
        ax.set_xlabel("RL step")
        ax.set_title(title)
        ax.legend()
        fig.tight_layout()
        fig.savefig(plot_dir / (prefix + name), dpi=90)
        plt.close(fig)
        written.append((title, prefix + name))
    return written


def write_rl_report(out: str | Path, config=None, extra: str = "") -> Path:
    out = Path(out)
    records = read_metrics(out / "metrics.jsonl")
    plots = plot_rl(records, out / "plots") if records else []
    lines = ["# RL run", ""]
    if config is not None:
        c = asdict(config)
        lines += [f"`glm5 rl`: env `{c['env']}`, algo `{c['algo']}`, mode `{c['mode']}`, {c['steps']} steps x "
                  f"{c['rollout_batch']} groups x {c['group_size']} responses, max {c['max_new_tokens']} new tokens "
                  f"per turn, lr {c['lr']}, mismatch correction `{c['mismatch']}`.", ""]
    if records:
        first, last = records[0], records[-1]
        lines += ["| | first step | last step |", "|---|---|---|"]
        for key in ("reward_mean", "response_len_mean", "staleness_mean", "mismatch_kl", "rollout_tokens_per_s",
                    "train_tokens_per_s"):
            lines.append(f"| {key} | {first.get(key, float('nan')):.4g} | {last.get(key, float('nan')):.4g} |")
        lines.append("")
    if extra:
        lines += [extra, ""]
    for title, name in plots:
        lines += [f"## {title}", "", f"![{title}](plots/{name})", ""]
    path = out / "report.md"
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)
    return path
