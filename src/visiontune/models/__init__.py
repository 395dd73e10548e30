"""Model loading (hub id, local directory, inline config) and LoRA through PEFT."""
