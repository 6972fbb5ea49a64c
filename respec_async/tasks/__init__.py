"""Tasks: prompts with verifiable answers and their rule rewards.

`arithmetic` is the synthetic task of the tiny zoo (multi-digit addition written out column by
column); `math` scores GSM8K-style final answers; `dataset` reads a JSONL file of prompt/answer
records in a deterministic, resumable order.
"""
