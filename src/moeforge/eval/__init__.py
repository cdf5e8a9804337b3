"""Evaluation: perplexity with routing statistics, plots, and lm-evaluation-harness benchmarks.

Import from the modules, so that each pulls in only what it needs (matplotlib for plots, the optional
harness for benchmarks): :func:`moeforge.eval.perplexity.perplexity`, :mod:`moeforge.eval.plots`
(``plot_loss_curves``, ``plot_expert_load``, ``plot_load_over_time``) and
:func:`moeforge.eval.lm_eval.run_lm_eval`. ``moeforge eval`` is the command-line front end.
"""
