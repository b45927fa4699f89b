"""PNG plots of a circuit evolution (matplotlib, Agg backend: no display needed).

    layer_activation.png   heatmap: block x checkpoint, fraction of edges into the block in the circuit
    logit_lens.png         heatmap: block x checkpoint, mean probability of the target token (logit lens)
    metrics.png            curves: faithfulness, Hit@k (circuit, model), node/edge Jaccard with the final
                           circuit, edge entropy; the phase change marked with a vertical line
    head_classes.png       stacked bars: mover / relation / mixture heads in each checkpoint's circuit
    size_curve.png         faithfulness and Hit@k against circuit size (fraction of edges), a curve per checkpoint
    acquisition.png        per knowledge type: the full model's hit@1 and Hit@k on the probes (if measured)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from jax_controlllm.circuits.evolution import Evolution
from jax_controlllm.circuits.heads import HEAD_CLASSES


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _heatmap(plt, values: np.ndarray, names: list, row_labels: list, title: str, colorbar: str, path: Path):
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(names) + 2), max(3.0, 0.35 * len(row_labels) + 1.5)))
    image = ax.imshow(values, aspect="auto", origin="lower", cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(row_labels)), row_labels, fontsize=8)
    ax.set_xlabel("checkpoint")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label=colorbar)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_evolution(evolution: Evolution, out_dir) -> dict[str, Path]:
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cps = evolution.checkpoints
    names = [c.name for c in cps]
    paths = {}

    ratio = np.array([c.layer_activation_ratio for c in cps]).T            # [blocks + 1, checkpoints]
    rows = [f"L{i}" for i in range(ratio.shape[0] - 1)] + ["logits"]
    paths["layer_activation"] = out_dir / "layer_activation.png"
    _heatmap(plt, ratio, names, rows, "edge activation ratio per layer", "circuit edges / edges",
             paths["layer_activation"])

    lens = np.array([c.lens_probability for c in cps]).T
    paths["logit_lens"] = out_dir / "logit_lens.png"
    _heatmap(plt, lens, names, [f"L{i}" for i in range(lens.shape[0])], "logit lens: target probability",
             "mean probability", paths["logit_lens"])

    x = np.arange(len(cps))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(5.0, 0.6 * len(cps) + 3), 6), sharex=True)
    top.plot(x, [c.faithfulness for c in cps], "o-", label="faithfulness")
    top.plot(x, [np.nan if c.hit_at_k is None else c.hit_at_k for c in cps], "s-",
             label=f"Hit@{evolution.settings.hit_k} (circuit, zero-ablated)")
    top.plot(x, [np.nan if c.hit_at_k_mean is None else c.hit_at_k_mean for c in cps], "v-",
             label=f"Hit@{evolution.settings.hit_k} (circuit, mean-ablated)")
    top.plot(x, [c.model_hit_at_k for c in cps], "^--", label=f"Hit@{evolution.settings.hit_k} (model)")
    top.plot(x, evolution.node_jaccard, "d-", label="node Jaccard vs final")
    top.plot(x, evolution.edge_jaccard, "x-", label="edge Jaccard vs final")
    top.set_ylabel("value")
    top.legend(fontsize=7, loc="best")
    bottom.plot(x, [np.nan if c.edge_entropy is None else c.edge_entropy for c in cps], "o-", color="tab:purple")
    bottom.set_ylabel("edge entropy")
    for ax in (top, bottom):
        ax.axvline(evolution.phase_change, color="red", linestyle=":", label="phase change")
        ax.grid(alpha=0.3)
    top.set_title(f"circuit metrics (phase change at {names[evolution.phase_change]})")
    bottom.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
    fig.tight_layout()
    paths["metrics"] = out_dir / "metrics.png"
    fig.savefig(paths["metrics"], dpi=120)
    plt.close(fig)

    counts = np.array([[sum(h["class"] == k for h in c.head_classes.values()) for k in HEAD_CLASSES] for c in cps])
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(cps) + 2), 3.5))
    bottom_edge = np.zeros(len(cps))
    for j, kind in enumerate(HEAD_CLASSES):
        ax.bar(x, counts[:, j], bottom=bottom_edge, label=kind)
        bottom_edge += counts[:, j]
    ax.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("heads in the circuit")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths["head_classes"] = out_dir / "head_classes.png"
    fig.savefig(paths["head_classes"], dpi=120)
    plt.close(fig)
    paths["size_curve"] = plot_size_curve(plt, evolution, out_dir / "size_curve.png")
    if any(c.acquisition for c in cps):
        paths["acquisition"] = plot_acquisition(plt, evolution, out_dir / "acquisition.png")
    return paths


def plot_size_curve(plt, evolution: Evolution, path: Path) -> Path:
    """Faithfulness and Hit@k of the top-n circuit against its size, one curve per checkpoint: the smallest
    faithful circuit is where a curve reaches 1."""
    k = evolution.settings.hit_k
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(evolution.checkpoints)))
    for c, color in zip(evolution.checkpoints, colors):
        x = [100 * p["fraction"] for p in c.size_curve]
        left.plot(x, [p["faithfulness"] for p in c.size_curve], "o-", color=color, label=c.name)
        right.plot(x, [np.nan if p["hit_at_k"] is None else p["hit_at_k"] for p in c.size_curve], "o-",
                   color=color, label=f"{c.name}, zero-ablated")
        right.plot(x, [np.nan if p.get("hit_at_k_mean") is None else p["hit_at_k_mean"] for p in c.size_curve],
                   "v--", color=color, label=f"{c.name}, mean-ablated")
        right.axhline(c.model_hit_at_k, color=color, linestyle=":", linewidth=1)
    for ax, label in ((left, "faithfulness"), (right, f"Hit@{k} (circuit; dotted: whole model)")):
        ax.set_xscale("log")
        ax.set_xlabel("circuit size (% of the graph's edges, after pruning)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    left.axhline(1.0, color="grey", linewidth=0.8)
    left.legend(fontsize=7)
    right.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_acquisition(plt, evolution: Evolution, path: Path) -> Path:
    cps = evolution.checkpoints
    k = evolution.settings.hit_k
    kinds = sorted({kind for c in cps for kind in c.acquisition})
    x = np.arange(len(cps))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(cps) + 3), 3.8))
    for kind, color in zip(kinds, ("tab:blue", "tab:orange", "tab:green")):
        n = max(c.acquisition.get(kind, {}).get("n", 0) for c in cps)
        ax.plot(x, [c.acquisition.get(kind, {}).get("hit@1", np.nan) for c in cps], "o-", color=color,
                label=f"{kind} (n={n}): top-1")
        ax.plot(x, [c.acquisition.get(kind, {}).get(f"hit@{k}", np.nan) for c in cps], "s--", color=color,
                label=f"{kind}: top-{k}")
    ax.set_xticks(x, [c.name for c in cps], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("answer's first token ranked")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("acquisition per knowledge type")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
