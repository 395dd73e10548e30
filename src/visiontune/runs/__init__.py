"""The run directory: its layout, logs, metrics files, summary and pictures."""
