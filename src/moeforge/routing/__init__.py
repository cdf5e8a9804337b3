"""Router losses, routing statistics and aux-loss-free balancing for MoE models (moeforge_llama, Mixtral,
Qwen2-MoE, Qwen3-MoE).

``attach_router_losses(model, RouterLossConfig(...))`` makes the model's own forward add the per-layer,
padding-masked router losses to ``loss``, weighted like the LM loss under gradient accumulation, so any
training loop gets them; ``observe_routers(model)`` collects statistics only.
"""

from moeforge.config.router_losses import RouterLossConfig
from moeforge.routing.aux_free import AuxFreeBalancer
from moeforge.routing.hooks import RouterLossHandle, attach_router_losses, find_routers, observe_routers
from moeforge.routing.losses import mutual_information_loss, switch_balance_loss, z_loss
from moeforge.routing.stats import RoutingStats

__all__ = [
    "AuxFreeBalancer",
    "RouterLossConfig",
    "RouterLossHandle",
    "RoutingStats",
    "attach_router_losses",
    "find_routers",
    "mutual_information_loss",
    "observe_routers",
    "switch_balance_loss",
    "z_loss",
]
