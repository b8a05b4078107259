"""PPO / GRPO / RLOO math: advantages, KL penalties, clipped losses."""
