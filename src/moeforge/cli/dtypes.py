"""The ``--dtype`` choices of the commands that load a model (chat, eval, merge).

They run a model in the dtypes a training recipe may load it in (``dtype:`` of :class:`TrainRecipe`), not
convert's, whose ``auto`` and ``float16`` describe the checkpoint it writes.
"""

from moeforge.cli.choices import field_choices
from moeforge.config.train_recipe import TrainRecipe
from moeforge.io.loading import TORCH_DTYPES

DTYPES = {name: TORCH_DTYPES[name] for name in field_choices(TrainRecipe, "dtype")}
