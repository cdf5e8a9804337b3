"""The ``--dtype`` choices the commands that load a model share."""

from moeforge.io.loading import TORCH_DTYPES

DTYPES = {name: TORCH_DTYPES[name] for name in ("float32", "bfloat16")}
