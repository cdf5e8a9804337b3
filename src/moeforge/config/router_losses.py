"""The ``router_losses:`` recipe section: the weights of the router losses and aux-loss-free balancing.

The losses themselves are computed in :mod:`moeforge.routing.losses`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class RouterLossConfig(BaseModel):
    """Coefficients of the router losses added to the LM loss, and DeepSeek-V3's aux-loss-free balancing.

    ``aux_free_rate`` is the bias step γ (in logit units) applied per optimizer step; see
    :class:`moeforge.routing.aux_free.AuxFreeBalancer`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # ``default=`` as a keyword: type checkers only see a positional Field default as "required", which
    # would make ``Field(default_factory=RouterLossConfig)`` look like a call missing its arguments.
    balance_coef: float = Field(default=0.01, ge=0)
    z_coef: float = Field(default=0.0, ge=0)
    mi_coef: float = Field(default=0.0, ge=0)
    aux_free: bool = False
    aux_free_rate: float = Field(default=1e-3, gt=0)
