"""chatgpt_recipes: the code under the scripts in recipes/, in folders that are layers, lowest first. Each folder
imports only from the folders before it; `cli` (the recipes' front door) sits on top and nothing here imports it.

runtime → data → modeling → rl → evaluation → training → self_instruct → cli

The package map, one line per module: docs/package.md. tests/test_layers.py keeps the order.
"""
