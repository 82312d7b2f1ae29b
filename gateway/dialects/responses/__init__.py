"""The OpenAI Responses API over chat completions."""
