"""relay: a self-hosted OpenAI-compatible API relay with its own keys, usage, limits and quotas."""
