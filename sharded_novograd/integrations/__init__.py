"""Bindings to training frameworks. Each module imports its framework lazily."""
