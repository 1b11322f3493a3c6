"""Router modules: a token's hidden state -> two logits [execute, skip]."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

RMS_EPS = 1e-6


class _InputScaledLinear(nn.Linear):
    """nn.Linear that can scale each token's input by a per-token scalar, applied to its outputs instead.

    W (s * h) + b == s * (W h) + b: scaling the router's few outputs rather than its d-wide input saves a pass
    over the hidden states. Still a module call (ZeRO-3 gathers a module's parameters in its forward hooks), and
    the parameters and state-dict keys are those of nn.Linear.
    """

    def forward(self, x: torch.Tensor, scale=None) -> torch.Tensor:
        if scale is None:
            return super().forward(x)
        return torch.addcmul(self.bias, F.linear(x, self.weight), scale)


class Router(nn.Module):
    """`linear`: Linear(d, 2). `mlp`: d -> d/4 -> ReLU -> 2.

    Initialised so every token executes with a clear margin: training starts from the dense model and the
    sparsity loss pulls tokens off, instead of starting from a random half-skipped model.
    With normalize_input (default) the router reads the hidden state scaled to unit RMS (no parameters): the
    residual stream's scale grows with depth and has outlier channels in the hundreds, which would make router
    logits, and the effective learning rate, differ wildly between layers.
    """

    def __init__(self, hidden_size: int, router_type: str = "linear", init_bias: float = 2.0,
                 normalize_input: bool = True):
        super().__init__()
        self.router_type = router_type
        self.normalize_input = normalize_input
        if router_type == "linear":
            self.net = _InputScaledLinear(hidden_size, 2)
        else:
            self.net = nn.Sequential(_InputScaledLinear(hidden_size, max(1, hidden_size // 4)), nn.ReLU(),
                                     nn.Linear(max(1, hidden_size // 4), 2))
        self.reset_parameters(init_bias)

    def reset_parameters(self, init_bias: float = 2.0) -> None:
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, std=0.01)
                    nn.init.zeros_(module.bias)
        self.set_margin_bias(init_bias)

    @property
    def last_linear(self) -> nn.Linear:
        """The layer whose bias holds the [execute, skip] offset."""
        return self.net if isinstance(self.net, nn.Linear) else self.net[-1]

    @torch.no_grad()
    def set_margin_bias(self, margin: float, add: bool = False) -> None:
        """Set (or with add=True shift) the execute - skip margin the last bias contributes: [m/2, -m/2]."""
        bias = self.last_linear.bias
        value = torch.tensor([margin / 2, -margin / 2], dtype=bias.dtype, device=bias.device)
        if hasattr(bias, "device_mesh"):  # an FSDP2 DTensor: each rank holds a slice of the (2,) bias
            from torch.distributed.tensor import distribute_tensor

            # every rank passes the same full value and keeps its own slice (no communication)
            value = distribute_tensor(value, bias.device_mesh, bias.placements, src_data_rank=None)
        bias.add_(value) if add else bias.copy_(value)

    def forward(self, h: torch.Tensor, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits (..., 2). scale: input_scale(h) when the caller already has it (both routers of a layer
        read the same h by default; each small op counts at token-by-token decode)."""
        first = self._first
        # Routers run in their weights' dtype: fp32 (attach_routers), or bf16 where a mixed-precision engine casts
        # the weights for compute; the gate logic upcasts logits to fp32. (Plain attribute reads, not
        # self.parameters(): this runs twice per layer at every decode step.)
        if h.dtype != first.weight.dtype:
            h = h.to(first.weight.dtype)
        if scale is None:
            scale = self.input_scale(h)
        if self.router_type == "linear":
            return first(h, scale)
        return self.net[2](self.net[1](first(h, scale)))

    def input_scale(self, h: torch.Tensor) -> Optional[torch.Tensor]:
        """Per-token 1 / RMS(h) (..., 1) in the router's dtype, or None without input normalisation.

        From the vector norm: one pass over h without a (B, S, d) temporary (pow then mean would write one).
        """
        if not self.normalize_input:
            return None
        # The norm accumulates in the router's dtype (fp32) without writing a cast copy of h (bf16 under a bf16
        # base): the reduction upcasts as it reads.
        norm = torch.linalg.vector_norm(h, dim=-1, keepdim=True, dtype=self._first.weight.dtype)
        # rsqrt(eps + norm^2 / d): three ops in all (each small op counts at token-by-token decode)
        return torch.rsqrt(torch.addcmul(self._eps(norm), norm, norm, value=1.0 / h.shape[-1]))

    def _eps(self, like: torch.Tensor) -> torch.Tensor:
        """RMS_EPS as a 0-d tensor on like's device and dtype, made once (a constant, not a buffer or state)."""
        eps = self.__dict__.get("_eps_tensor")
        if eps is None or eps.device != like.device or eps.dtype != like.dtype:
            eps = self.__dict__["_eps_tensor"] = torch.tensor(RMS_EPS, device=like.device, dtype=like.dtype)
        return eps

    @property
    def _first(self) -> nn.Linear:
        return self.net if self.router_type == "linear" else self.net[0]
