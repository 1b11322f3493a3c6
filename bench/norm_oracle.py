"""A reference for per-token skipping on a given model: the output-norm oracle (not a deployable method).

Each sublayer runs on every token, and its output is dropped for the tokens where it is small against the
residual stream: ||f(x_t)|| / ||h_t|| below one threshold shared by every attention and MLP sublayer, tuned so the
model skips the target fraction of sublayer executions. It reads what a sublayer computes to decide whether to
skip it, so it saves nothing; it shows what skipping "the tokens a sublayer barely changes" costs this model,
which a router (which decides from the block input, before the sublayer runs) should match to be doing well.
The decision at token t depends only on tokens <= t (causal), and skipped tokens keep their keys/values
(kv_policy=all).
"""
from __future__ import annotations

import math

import torch
from transformers import AutoModelForCausalLM


class NormOracle:
    """Hooks on a plain Hugging Face copy of a routed model's base weights."""

    def __init__(self, routed_model):
        base = {k: v for k, v in routed_model.state_dict().items() if "skipgpt_" not in k}
        self.model = AutoModelForCausalLM.from_config(routed_model.config).to(next(routed_model.parameters()).dtype)
        self.model.load_state_dict(base)
        self.model.eval()
        self.threshold = None  # None: collect ratios (every sublayer kept); else skip where ratio < threshold
        self.ratios: list[torch.Tensor] = []
        self.skipped = {"attn": 0, "mlp": 0}
        self.seen = {"attn": 0, "mlp": 0}
        self._residual = None
        for layer in self.model.model.layers:
            # the residual stream entering each sublayer: the layer input, then the post-attention state
            layer.register_forward_pre_hook(self._keep_residual, with_kwargs=True)
            layer.post_attention_layernorm.register_forward_pre_hook(self._keep_residual, with_kwargs=True)
            layer.self_attn.register_forward_hook(self._sublayer_hook("attn"))
            layer.mlp.register_forward_hook(self._sublayer_hook("mlp"))

    def _keep_residual(self, module, args, kwargs):
        self._residual = args[0] if args else kwargs["hidden_states"]

    def _sublayer_hook(self, kind: str):
        def hook(module, args, out):
            f = out[0] if isinstance(out, tuple) else out
            ratio = f.norm(dim=-1) / self._residual.norm(dim=-1).clamp_min(1e-12)
            if self.threshold is None:
                self.ratios.append(ratio.flatten())
                return out
            keep = ratio >= self.threshold
            self.skipped[kind] += int((~keep).sum())
            self.seen[kind] += keep.numel()
            f = f * keep[..., None].to(f.dtype)
            return (f,) + tuple(out[1:]) if isinstance(out, tuple) else f
        return hook

    @torch.no_grad()
    def perplexity(self, sequences: torch.Tensor, micro_batch_size: int) -> float:
        self.skipped, self.seen = {"attn": 0, "mlp": 0}, {"attn": 0, "mlp": 0}
        nll, tokens = 0.0, 0
        for ids in sequences.split(micro_batch_size):
            logits = self.model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="sum"))
            tokens += ids[:, 1:].numel()
        return math.exp(nll / tokens)

    def sparsity(self) -> tuple[float, float]:
        return tuple(self.skipped[k] / max(self.seen[k], 1) for k in ("attn", "mlp"))

    def calibrate(self, sequences: torch.Tensor, target: float, micro_batch_size: int, steps: int = 6) -> None:
        """Set the threshold so the mean skipped fraction is ~target on these sequences (bisection over the
        quantile of the full model's ratios: skipping changes later ratios, so the quantile is not the answer)."""
        self.threshold, self.ratios = None, []
        self.perplexity(sequences, micro_batch_size)
        ratios = torch.cat(self.ratios)
        low, high = 0.0, min(1.0, 2.0 * target)
        for _ in range(steps):
            q = (low + high) / 2
            self.threshold = float(torch.quantile(ratios, q))
            self.perplexity(sequences, micro_batch_size)
            attn, mlp = self.sparsity()
            low, high = (q, high) if (attn + mlp) / 2 < target else (low, q)
        self.threshold = float(torch.quantile(ratios, (low + high) / 2))
