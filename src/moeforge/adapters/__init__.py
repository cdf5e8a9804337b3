"""MoE adapters: mixtures of small LoRA experts trained on a frozen base (see :mod:`moeforge.adapters.moe_lora`)."""
