"""SkipGPT routing: routers, gates and routed decoder layers with real compute skipping."""
from .api import (attach_routers, count_router_parameters, inference_slots, load_routers, router_parameters,
                  router_state_dict, routed_layers, routing_context, routing_disabled, routing_stats, save_routers,
                  set_temperature, sparsity_loss)
from .config import RouterConfig

__all__ = ["RouterConfig", "attach_routers", "routing_stats", "sparsity_loss", "set_temperature", "save_routers",
           "load_routers", "routing_disabled", "routing_context", "router_parameters", "router_state_dict",
           "routed_layers", "count_router_parameters", "inference_slots"]
