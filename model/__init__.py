"""The DeepSeekMoE architecture, checkpoint loading, tokenizer and generation."""
