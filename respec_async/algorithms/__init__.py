"""Training objectives: the GRPO-family policy loss (`grpo`) and the reward-weighted unrolled
distillation loss of the drafter (`distill`)."""
