"""Output formats: safetensors today, the seam a second format (such as GGUF) would plug into."""
