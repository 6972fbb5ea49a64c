"""Inference engine: Llama/Qwen2 target model, EAGLE-3 drafter, exact speculative decoding with
continuous batching over a static KV cache. Plain PyTorch; CPU here, CUDA unchanged."""
