"""Data: safe image decoding, augmentation, and one module per on-disk format."""
