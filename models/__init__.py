"""Models built from jaxinfra ops, run from a checkout (not installed).

Planned: DeepSeek-V3 in Flax NNX (see the README's status table).
"""
