"""Command-line tools: model summary, benchmarks, checkpoint inspection."""
