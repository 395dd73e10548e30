"""visiontune: LoRA fine-tuning of vision and vision-language models, correct by default."""

__version__ = "0.1.0"
