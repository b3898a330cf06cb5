"""The OpenAI-compatible HTTP server: `tritium serve`."""
