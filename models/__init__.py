"""Models built from jaxinfra ops, run from a checkout (not installed).

* :mod:`models.deepseek_v3`: DeepSeek-V3 in Flax NNX.
"""
