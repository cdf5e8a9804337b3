"""``moeforge plan``: will a conversion + training run fit in GPU memory? Answered from configs alone."""
