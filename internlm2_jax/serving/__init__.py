"""OpenAI-compatible serving of InternLM2 chat models."""
