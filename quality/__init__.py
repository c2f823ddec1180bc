"""Quality as numbers: perplexity with its uncertainty, KL divergence against a base, quantization reports."""
