"""Router modules: a token's hidden state -> two logits [execute, skip]."""
from __future__ import annotations

import torch
from torch import nn


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
            self.net = nn.Linear(hidden_size, 2)
        else:
            self.net = nn.Sequential(nn.Linear(hidden_size, max(1, hidden_size // 4)), nn.ReLU(),
                                     nn.Linear(max(1, hidden_size // 4), 2))
        self.reset_parameters(init_bias)

    def reset_parameters(self, init_bias: float = 2.0) -> None:
        last = self.net if isinstance(self.net, nn.Linear) else self.net[-1]
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, std=0.01)
                    nn.init.zeros_(module.bias)
            last.bias.copy_(torch.tensor([init_bias / 2, -init_bias / 2]))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # Routers are tiny; they run in the hidden states' dtype and the gate logic upcasts to fp32.
        h = h.to(self.net_dtype)
        if self.normalize_input:
            h = h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + 1e-6)
        return self.net(h)

    @property
    def net_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype
