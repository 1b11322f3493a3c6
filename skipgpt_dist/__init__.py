"""skipgpt-dist: distributed SkipGPT training (routers + LoRA) with real compute skipping."""
from .errors import SkipGPTError
from .inference import load_routed_model  # noqa: F401  (lazy: imports transformers only when called)
from .routing import (RouterConfig, attach_routers, count_router_parameters, load_routers, router_parameters,
                      routing_context, routing_disabled, routing_stats, save_routers, set_temperature,
                      sparsity_loss)

__version__ = "0.1.0"
__all__ = ["SkipGPTError", "RouterConfig", "attach_routers", "routing_stats", "sparsity_loss", "set_temperature",
           "save_routers", "load_routers", "routing_disabled", "routing_context", "router_parameters",
           "count_router_parameters"]
