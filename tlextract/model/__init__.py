"""Loading models, the fast forward pass, tokenizer/device/padding helpers, memory."""
