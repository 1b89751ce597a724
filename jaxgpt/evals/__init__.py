"""Held-out task accuracy and the recipe's report."""
