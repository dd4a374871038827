"""Rewrites of the model before and after its export to Relax IR."""
