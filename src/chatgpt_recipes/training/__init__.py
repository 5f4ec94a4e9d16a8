"""Layer 6: resumable training and its checkpoints, the time budget, reward-model training and loading, saving and merging trained models."""
