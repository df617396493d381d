"""Downstream evaluators, one module per task; ``registry`` maps config kinds to them."""
