"""Routing report: where a trained routed model skips, per layer and per token (tools/routing_report.py).

collect_routing runs one eval forward of a text and records, for every layer and both sublayers, which tokens
executed (after capacity, exactly as the routed block decided: the same plan_sublayer on the same router logits)
and the router margin (execute - skip logit). write_report saves `report.json` and `report.png`:
top, the per-layer execute ratio of attention and MLP; below, one heatmap per sublayer kind (tokens on x, layers on
y; dark = skipped), token strings as tick labels for short texts. Matplotlib's Agg canvas only (no display).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import SkipGPTError

MAX_LABELLED_TOKENS = 64
KINDS = ("attn", "mlp")


def collect_routing(model, tokenizer, text: str, max_tokens: int = 256) -> dict:
    """Per-layer and per-token routing of one text (no noise; eval mode)."""
    from .routing import routed_layers, routing_context, routing_stats
    from .routing.layer import ATTN, MLP, plan_sublayer

    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :max_tokens]
    if ids.shape[1] == 0:
        raise SkipGPTError("the text has no tokens: give a non-empty --text or --text-file")
    layers = routed_layers(model)
    ctx = routing_context(model)
    decisions: dict[tuple[int, str], dict] = {}
    hooks = []
    for idx, layer in enumerate(layers):
        for kind, code, router in (("attn", ATTN, layer.skipgpt_attn_router), ("mlp", MLP, layer.skipgpt_mlp_router)):
            def hook(module, args, logits, idx=idx, kind=kind, code=code, layer=layer):
                layout = ctx.token_layout(logits.shape[0], logits.shape[1], 0, logits.device)
                plan = plan_sublayer(logits.detach(), layout, layer._skipgpt, code, False, False)
                margin = (logits[..., 0] - logits[..., 1]).float()
                decisions[(idx, kind)] = {"executed": plan.executed[0].tolist(), "margin": margin[0].tolist()}
            hooks.append(router.register_forward_hook(hook))
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model.eval()(input_ids=ids.to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    stats = routing_stats(model)
    return _summarise(tokenizer, ids[0].tolist(), decisions, stats, ctx.cfg, len(layers), text)


def _summarise(tokenizer, ids, decisions, stats, cfg, num_layers, text) -> dict:
    tokens = [tokenizer.decode([i]) for i in ids]
    per_layer = [{kind: {"execute": stats["layers"][i][kind]["execute"],
                         "overflow": stats["layers"][i][kind]["overflow"]} for kind in KINDS}
                 for i in range(num_layers)]
    token_map = {kind: [[int(x) for x in decisions[(i, kind)]["executed"]] for i in range(num_layers)]
                 for kind in KINDS}
    margins = {kind: [[round(float(x), 4) for x in decisions[(i, kind)]["margin"]] for i in range(num_layers)]
               for kind in KINDS}
    return {"text": text, "num_tokens": len(ids), "token_ids": ids, "tokens": tokens,
            "mode": cfg.mode, "capacity": cfg.capacity, "kv_policy": cfg.kv_policy, "num_layers": num_layers,
            "attn_execute": stats["attn_execute"], "mlp_execute": stats["mlp_execute"],
            "sparsity": stats["sparsity"], "layers": per_layer, "executed": token_map, "router_margin": margins}


def plot_report(report: dict, path: Path) -> None:
    """The PNG: per-layer execute ratios (bars) over per-token heatmaps for attention and MLP."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    n_tok, n_layers = report["num_tokens"], report["num_layers"]
    width = min(max(8.0, 0.22 * n_tok + 2.5), 40.0)
    height = 3.2 + 2 * max(1.6, 0.28 * n_layers + 0.8)
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(3, 1, height_ratios=[1.0, 1.3, 1.3], hspace=0.55)
    _plot_layer_bars(fig.add_subplot(grid[0]), report)
    cmap = ListedColormap(["#2b2b2b", "#f2c14e"])  # skipped, executed
    for row, kind in enumerate(KINDS, 1):
        ax = fig.add_subplot(grid[row])
        ax.imshow(report["executed"][kind], aspect="auto", interpolation="nearest", cmap=cmap, vmin=0, vmax=1)
        title = "attention" if kind == "attn" else "MLP"
        ax.set_title(f"{title}: executed (yellow) / skipped (dark) per token", fontsize=9)
        ax.set_ylabel("layer")
        ax.set_yticks(range(n_layers))
        if n_tok <= MAX_LABELLED_TOKENS:
            ax.set_xticks(range(n_tok))
            ax.set_xticklabels([_label(t) for t in report["tokens"]], rotation=90, fontsize=7)
        else:
            ax.set_xlabel("token position")
    fig.suptitle(f"SkipGPT routing: mode={report['mode']} capacity={report['capacity']} kv={report['kv_policy']}, "
                 f"{n_tok} tokens, sparsity {report['sparsity']:.3f}", fontsize=10)
    fig.savefig(str(path))


def _plot_layer_bars(ax, report: dict) -> None:
    layers = range(report["num_layers"])
    attn = [entry["attn"]["execute"] for entry in report["layers"]]
    mlp = [entry["mlp"]["execute"] for entry in report["layers"]]
    ax.bar([i - 0.2 for i in layers], attn, width=0.4, label=f"attention (mean {report['attn_execute']:.2f})")
    ax.bar([i + 0.2 for i in layers], mlp, width=0.4, label=f"MLP (mean {report['mlp_execute']:.2f})")
    ax.set_ylim(0, 1.05)
    ax.set_xticks(list(layers))
    ax.set_xlabel("layer")
    ax.set_ylabel("execute ratio")
    ax.legend(fontsize=8, loc="lower right")


def _label(token: str) -> str:
    shown = token.replace("\n", "\\n").replace("\t", "\\t")
    return shown if shown.strip() else repr(shown)


def write_report(report: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png, js = out_dir / "report.png", out_dir / "report.json"
    plot_report(report, png)
    js.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return png, js


def load_for_report(path: str, mode=None, capacity=None):
    """(routed model, tokenizer) from an exported folder or a training checkpoint / run folder."""
    from .inference import load_routed_model, skipgpt_section

    if skipgpt_section(path) is not None:
        from transformers import AutoTokenizer

        model = load_routed_model(path, mode=mode, capacity=capacity)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception as err:  # transformers raises many types for missing tokenizer files
            raise SkipGPTError(f"{path} has no usable tokenizer ({type(err).__name__}): copy the base model's "
                               "tokenizer files into it") from None
        return model, tokenizer
    from .training.restore import load_checkpoint_model

    model, tokenizer, _ = load_checkpoint_model(path, mode, capacity)
    return model, tokenizer
