"""Text and instruction data: reading, splitting into train/validation/test, tokenizing, packing (``text``)."""
