"""tokprune inside serving engines: `tokprune.serving.vllm` runs the registry's pre-LLM methods in vLLM."""
