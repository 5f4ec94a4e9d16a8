"""Layer 5: metrics, a policy's evaluation before and after RL, reports and plots, and the race table."""
