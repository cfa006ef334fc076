"""streambroker: LLM output from the model to its readers, through Redis Streams."""
