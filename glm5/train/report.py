"""The run report: PNG plots and `report.md` from a run's `metrics.jsonl` (+ a summary dict).

    from glm5.train.report import write_report
    write_report("runs/demo", summary)    # -> runs/demo/report.md, runs/demo/plots/*.png

Plots: loss per stage, per-layer expert load imbalance over steps and the final load per expert,
indexer KL in the DSA stages, MTP accuracy, throughput. matplotlib with the Agg backend (no display).
"""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _by_stage(records: list[dict]) -> dict[str, list[dict]]:
    stages: dict[str, list[dict]] = {}
    for r in records:
        stages.setdefault(r["stage"], []).append(r)
    return stages


def make_plots(records: list[dict], plot_dir: Path, moe_layers: list[str] | None = None) -> list[tuple[str, str]]:
    """-> [(title, file name)] of the plots written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    stages = _by_stage(records)
    written = []

    def save(fig, name, title):
        fig.tight_layout()
        fig.savefig(plot_dir / name, dpi=90)
        plt.close(fig)
        written.append((title, name))

    # loss per stage, on one global step axis
    fig, ax = plt.subplots(figsize=(8, 4))
    offset = 0
    for stage, recs in stages.items():
        steps, values = [offset + r["step"] for r in recs], [r["loss"] for r in recs]
        line, = ax.plot(steps, values, alpha=0.3)
        # batches mix easy chats and hard code, so single steps are noisy: a 10-step mean on top
        smooth = [sum(values[max(0, i - 9) : i + 1]) / len(values[max(0, i - 9) : i + 1]) for i in range(len(values))]
        ax.plot(steps, smooth, color=line.get_color(),
                label=f"{stage} ({'indexer KL' if stage == 'dsa-warmup' else 'LM loss'}; 10-step mean)")
        offset += recs[-1]["step"]
    ax.set_xlabel("step (stages in sequence)")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("Training loss per stage")
    save(fig, "loss.png", "Loss curves")

    # expert load: imbalance over steps per layer, and the last step's load per expert
    with_load = [r for r in records if r.get("expert_imbalance")]
    if with_load:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        n_layers = len(with_load[0]["expert_imbalance"])
        names = moe_layers or [f"MoE block {i}" for i in range(n_layers)]
        for layer in range(n_layers):
            ax1.plot(range(1, len(with_load) + 1), [r["expert_imbalance"][layer] for r in with_load], label=names[layer])
        offset = 0
        for recs in stages.values():
            offset += recs[-1]["step"]
            ax1.axvline(offset + 0.5, color="grey", lw=0.6, ls=":")
        ax1.set_xlabel("step (stages in sequence; dotted: stage ends)")
        ax1.set_ylabel("max / mean tokens per expert")
        ax1.set_title("Expert load imbalance")
        ax1.legend(fontsize=7)
        stage, recs = list(stages.items())[-1]
        tail = [r for r in recs if r.get("expert_load")][-20:]
        width = 0.8 / n_layers
        for layer in range(n_layers):
            load = [sum(r["expert_load"][layer][e] for r in tail) for e in range(len(tail[-1]["expert_load"][layer]))]
            total = sum(load) or 1
            ax2.bar([e + layer * width for e in range(len(load))], [x / total for x in load], width, label=names[layer])
        ax2.axhline(1 / len(load), color="grey", lw=0.6, ls=":")
        ax2.set_xlabel("expert")
        ax2.set_ylabel(f"share of routed tokens ({stage}, last {len(tail)} steps)")
        ax2.set_title("Per-layer expert load (dotted: uniform)")
        ax2.legend(fontsize=7)
        save(fig, "expert_load.png", "Per-layer expert load")

    kl_fig = None
    offset = 0
    for stage, recs in stages.items():
        with_kl = [r for r in recs if r.get("indexer_kl") is not None]
        if with_kl:
            if kl_fig is None:
                kl_fig, ax = plt.subplots(figsize=(8, 4))
            # dsa-warmup: KL over all earlier keys; sparse stages: KL over each query's top-k keys only
            scope = "all keys" if stage == "dsa-warmup" else "top-k keys only"
            ax.plot([offset + r["step"] for r in with_kl], [r["indexer_kl"] for r in with_kl], label=f"{stage} ({scope})")
        offset += recs[-1]["step"]
    if kl_fig is not None:
        ax.set_xlabel("step (stages in sequence)")
        ax.set_ylabel("KL(main attention || indexer), summed over layers")
        ax.set_yscale("log")
        ax.set_title("Indexer KL")
        ax.legend()
        save(kl_fig, "indexer_kl.png", "Indexer KL")

    def plot_across_stages(key, ylabel, title, name, skip=()):
        # one global step axis: the stages follow each other
        fig, ax = plt.subplots(figsize=(8, 4))
        offset = 0
        for stage, recs in stages.items():
            if stage not in skip:
                ax.plot([offset + r["step"] for r in recs], [r.get(key) if r.get(key) is not None else float("nan") for r in recs], label=stage)
            offset += recs[-1]["step"]
        ax.set_xlabel("step (stages in sequence)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend()
        save(fig, name, title)

    plot_across_stages("mtp_acc", "top-1 accuracy of token t+2\n(SFT: assistant tokens only)", "MTP accuracy", "mtp_accuracy.png", skip=("dsa-warmup",))
    plot_across_stages("tokens_per_s", "tokens / s", "Training throughput", "throughput.png")
    return written


def stage_table(records: list[dict], probes: dict | None = None) -> list[dict]:
    """One row per stage: first / last step loss, k-step means at both ends, ...; with `probes`
    ({stage: {"start": {...}, "end": {...}}} from Trainer summaries), the fixed probe rows' loss at the stage's
    start and end (probe_start / probe_end, and the LM loss and indexer KL apart)."""
    rows = []
    for stage, recs in _by_stage(records).items():
        k = max(1, min(10, len(recs) // 4))  # smooth the ends over a few steps: single steps are noisy
        first = sum(r["loss"] for r in recs[:k]) / k
        last = sum(r["loss"] for r in recs[-k:]) / k
        speed = sorted(r.get("tokens_per_s", 0) for r in recs)
        rows.append({"stage": stage, "steps": recs[-1]["step"], "loss_start": recs[0]["loss"], "loss_end": recs[-1]["loss"],
                     f"loss_first{k}": first, f"loss_last{k}": last, "smoothing": k,
                     "mtp_acc_end": recs[-1].get("mtp_acc"), "indexer_kl_end": recs[-1].get("indexer_kl"),
                     "imbalance_end": max(recs[-1].get("expert_imbalance") or [0]),
                     "tokens_per_s_median": speed[len(speed) // 2]})
        probe = (probes or {}).get(stage)
        if probe and probe.get("start") and probe.get("end"):
            rows[-1].update({"probe_start": probe["start"]["loss"], "probe_end": probe["end"]["loss"],
                             "probe_lm_start": probe["start"]["lm_loss"], "probe_lm_end": probe["end"]["lm_loss"],
                             "probe_kl_start": probe["start"]["indexer_kl"], "probe_kl_end": probe["end"]["indexer_kl"],
                             "probe_rows": probe["start"]["rows"]})
    return rows


# the attention each held-out row of the demo is scored under (what the stage before it left set)
HELDOUT_ATTENTION = {"start": "DSA top-k, untrained indexer", "pretrain": "dense", "dsa-warmup": "dense",
                     "dsa-sparse": "DSA top-k", "sft": "DSA top-k"}


def write_report(run_dir: str | Path, summary: dict) -> Path:
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    plots = make_plots(records, run_dir / "plots", summary.get("moe_layers")) if records else []
    lines = [f"# Run report: {summary.get('name', run_dir.name)}", ""]
    if summary.get("description"):
        lines += [summary["description"], ""]
    lines += ["## Stages", "", "| stage | steps | fixed probe rows: start → end | loss at start | loss at end | "
              "mean of first / last steps | MTP acc (end) | indexer KL (end) | worst expert imbalance (end) | "
              "tokens/s (median) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in stage_table(records, summary.get("probes")):
        k = row["smoothing"]
        kl = f"{row['indexer_kl_end']:.4f}" if row["indexer_kl_end"] is not None else "–"
        mtp = f"{row['mtp_acc_end']:.3f}" if row["mtp_acc_end"] is not None else "–"
        probe = f"{row['probe_start']:.3f} → {row['probe_end']:.3f}" if "probe_start" in row else "–"
        lines.append(f"| {row['stage']} | {row['steps']} | {probe} | {row['loss_start']:.3f} | {row['loss_end']:.3f} | "
                     f"{row[f'loss_first{k}']:.3f} → {row[f'loss_last{k}']:.3f} ({k} steps) | {mtp} | {kl} | "
                     f"{row['imbalance_end']:.2f} | {row['tokens_per_s_median']:.0f} |")
    lines += ["", "The dsa-warmup loss is the indexer KL (summed over layers); the others are the LM loss "
              "(SFT: on assistant tokens only). Fixed probe rows: the same held-out rows (stdlib text and chats; "
              "for SFT held-out conversations) scored by the stage's own objective and attention (dense, or DSA's "
              "top-k) before its first step and after its last: what the stage did, free of batch noise. Pretraining "
              "and DSA batches mix code and chat rows in a fixed proportion.", ""]
    if summary.get("heldout_by_stage"):
        names = list(next(iter(summary["heldout_by_stage"].values())))
        lines += ["## Held-out loss after each stage", "", "| after | attention | " + " | ".join(names) + " |",
                  "|---|---|" + "---|" * len(names)]
        for stage, values in summary["heldout_by_stage"].items():
            lines.append(f"| {stage} | {HELDOUT_ATTENTION.get(stage, '')} | "
                         + " | ".join(f"{values[n]:.3f}" for n in names) + " |")
        lines += ["", "stdlib: held-out Python text; chats: held-out rendered conversations (all tokens); "
                  "sft: held-out conversations, assistant tokens only. Scored under the attention the stage left "
                  "set: the DSA warm-up trains only the indexers, which dense attention does not use, so its row "
                  "repeats pretraining's.", ""]
    if summary.get("final"):
        lines += ["## Final", "", "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {value} |" for key, value in summary["final"].items()]
        lines.append("")
    for title, name in plots:
        lines += [f"## {title}", "", f"![{title}](plots/{name})", ""]
    if summary.get("sample_chat"):
        lines += ["## Sample chat", "", "```", summary["sample_chat"], "```", ""]
    if summary.get("eval_samples"):
        lines += ["## Eval answers (first few)", "", "| request | output | valid | correct |", "|---|---|---|---|"]
        for s in summary["eval_samples"][:8]:
            out = s["output"].replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {s['request']} | `{out}` | {s['valid']} | {s['correct']} |")
        lines.append("")
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
