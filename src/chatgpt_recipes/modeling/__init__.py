"""Layer 3: models loaded by name, directory, adapter, GGUF or 4-bit; weight files checked; LoRA targets; training kernels and attention; generation."""
