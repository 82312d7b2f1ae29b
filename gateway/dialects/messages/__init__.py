"""The Anthropic Messages API over chat completions."""
