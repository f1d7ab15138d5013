"""Training and serving pipelines, run from a checkout: ``python -m pipelines.<name>``.

Planned: data preprocessing, training and serving for DeepSeek-V3 (see the
README's status table).
"""
