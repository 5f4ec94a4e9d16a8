"""Layer 4: what the RL recipes share: prompt sets and their checks, and the PPO trainer (TRL's, with PPO-ptx and resumable checkpoints)."""
