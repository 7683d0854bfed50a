"""Thin adapters for training frameworks. Each module imports its framework lazily, so importing
lowbit_adamw never requires transformers or lightning."""
