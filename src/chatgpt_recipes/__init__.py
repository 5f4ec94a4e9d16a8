"""chatgpt_recipes: the code under the scripts in recipes/, one module per job.

config (YAML + flags, errors), precision (the bf16/fp16/fp32 decision), models (loading, LoRA, 4-bit), templates
(prompt rendering for every stage, stage_info.json), rows (reading rows, the skip policy, the data cache),
sft_data, preferences, text_data, rl_inputs (each stage's data), reward (reward and value models), merging
(saving LoRA merged), resume (complete-checkpoint resume and the NaN/disk guards), time_budget, generation,
policy_eval, metrics, reporting (report.md, plots, JSON), compat (every touch of a library's internals, version
checked). Serving one recipe each, holding machinery that would bury its steps: speed (SFT), ppo_trainer (PPO),
self_instruct, instruction_generators, rouge_dedup (self-instruct), tokenizer_training (pretraining).
"""
