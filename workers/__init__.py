"""arq workers: the generate job and the model providers."""
