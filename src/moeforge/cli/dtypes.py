"""The ``--dtype`` choices of the commands that load a model (chat, eval, merge).

They run a model in the dtypes a training recipe may load it in (``dtype:`` of :class:`TrainRecipe`), not
convert's, whose ``auto`` and ``float16`` describe the checkpoint it writes.
"""

from moeforge.cli.choices import field_choices
from moeforge.config.train_recipe import TrainRecipe

DTYPES: list[str] = field_choices(TrainRecipe, "dtype")
"""Names only: the commands map them to torch dtypes when they run (``--help`` must not import torch)."""
