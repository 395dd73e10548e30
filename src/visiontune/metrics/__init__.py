"""Metrics per task, plus acceptance criteria over any of them."""
