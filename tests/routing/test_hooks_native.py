"""attach_router_losses on transformers' own MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE): the loss is the plain LM loss
plus our per-layer aux, and transformers' all-layer aux is no longer added."""

from __future__ import annotations

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter, load_balancing_loss_func
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

from moeforge.routing import RouterLossConfig, attach_router_losses, find_routers
from moeforge.routing.losses import mutual_information_loss, switch_balance_loss, z_loss
from tests.routing.tiny import batch, captured_router_logits, lm_loss, mixtral_model, qwen2_moe_model, qwen3_moe_model

CONFIG = RouterLossConfig(balance_coef=0.1, z_coef=0.01, mi_coef=0.2)
NATIVE = {
    "mixtral": (mixtral_model, MixtralTopKRouter),
    "qwen2_moe": (qwen2_moe_model, Qwen2MoeTopKRouter),
    "qwen3_moe": (qwen3_moe_model, Qwen3MoeTopKRouter),
}


def hand_aux(logits: list[torch.Tensor], mask: torch.Tensor, config: RouterLossConfig = CONFIG) -> torch.Tensor:
    return (
        config.balance_coef * switch_balance_loss(logits, 2, mask)
        + config.z_coef * z_loss(logits, mask)
        + config.mi_coef * mutual_information_loss(logits, mask)
    )


def test_routers_are_found_in_layer_order_and_dense_layers_skipped() -> None:
    assert [(r.name, r.num_experts, r.top_k) for r in find_routers(mixtral_model())] == [
        ("model.layers.0.mlp.gate", 4, 2),
        ("model.layers.1.mlp.gate", 4, 2),
    ]
    assert [r.label for r in find_routers(qwen2_moe_model())] == ["1", "2"]  # layer 0 is mlp_only


@pytest.mark.parametrize("arch", list(NATIVE))
def test_loss_is_plain_lm_loss_plus_per_layer_aux(arch: str) -> None:
    build, router_type = NATIVE[arch]
    model = build().train()
    inputs = batch()
    handle = attach_router_losses(model, CONFIG)
    assert model.config.output_router_logits is False
    with captured_router_logits(model, router_type) as logits:
        out = model(**inputs)
    mask = inputs["attention_mask"].reshape(-1).bool()
    aux = hand_aux(logits, mask)
    torch.testing.assert_close(out.loss, lm_loss(out.logits, inputs["labels"]) + aux, rtol=1e-6, atol=1e-6)
    assert out.aux_loss is None and out.router_logits is None  # transformers computed no aux of its own
    torch.testing.assert_close(out["loss"], out.loss)  # what Trainer reads
    torch.testing.assert_close(out.router_losses["aux"], aux.detach())
    torch.testing.assert_close(out.router_losses["balance"], switch_balance_loss(logits, 2, mask).detach())
    assert handle.losses is out.router_losses

    handle.detach()
    assert model.config.output_router_logits is True
    with captured_router_logits(model, router_type) as logits:
        out = model(**inputs)
    # what transformers adds on its own: 0.05 x one balance over all layers pooled
    theirs = 0.05 * load_balancing_loss_func(tuple(logits), 4, 2, inputs["attention_mask"])
    torch.testing.assert_close(out.loss, lm_loss(out.logits, inputs["labels"]) + theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", list(NATIVE))
def test_eval_mode_reports_the_losses_but_leaves_the_lm_loss_alone(arch: str) -> None:
    build, router_type = NATIVE[arch]
    model = build().eval()
    attach_router_losses(model, CONFIG)
    inputs = batch()
    with torch.no_grad(), captured_router_logits(model, router_type) as logits:
        out = model(**inputs)
    torch.testing.assert_close(out.loss, lm_loss(out.logits, inputs["labels"]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.router_losses["aux"], hand_aux(logits, inputs["attention_mask"].reshape(-1).bool()))
    assert out.router_aux_loss is None


def test_return_dict_false_tuple_gets_the_aux_too() -> None:
    model = mixtral_model().train()
    attach_router_losses(model, CONFIG)
    inputs = batch()
    with captured_router_logits(model, MixtralTopKRouter) as logits:
        out = model(**inputs, return_dict=False)
    assert isinstance(out, tuple)
    aux = hand_aux(logits, inputs["attention_mask"].reshape(-1).bool())
    torch.testing.assert_close(out[0], lm_loss(out[1], inputs["labels"]) + aux, rtol=1e-6, atol=1e-6)


def test_asking_transformers_for_its_own_aux_warns() -> None:
    model = mixtral_model().train()
    attach_router_losses(model, CONFIG)
    with pytest.warns(UserWarning, match="its own"):
        model(**batch(), output_router_logits=True)
