"""The code under the recipes: model and data loading, prompts, config parsing, training machinery, reports.

Most modules serve several recipes. A few serve one (metrics: evaluation; speed, ppo_trainer, self_instruct,
instruction_generators, tokenizer_training: their recipe) and hold machinery that would bury that recipe's steps,
so each recipe in `recipes/` still reads top to bottom.
"""
