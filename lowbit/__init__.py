"""lowbit: calibrate, quantize and evaluate LLMs for vLLM."""
