"""Layer 7: Alpaca-style self-instruct: seed tasks, request prompts, parsing and filters (tasks), the generators, the ROUGE-L filter."""
