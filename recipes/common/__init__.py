"""Shared code of the recipes: model loading, data loading, templates, config parsing, reports.

Only what two or more recipes use lives here; each recipe in `recipes/` reads top to bottom.
"""
