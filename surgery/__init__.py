"""surgery: streaming weight surgery for LLM checkpoints."""
