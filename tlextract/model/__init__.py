"""Loading models, tokenizer/device/padding helpers, memory; the accelerator in ``accel/``."""
