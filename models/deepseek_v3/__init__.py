"""DeepSeek-V3 in Flax NNX from jaxinfra ops (run from a checkout: ``models`` is not installed).

* :mod:`models.deepseek_v3.config`: :class:`Config`, ``CONFIGS`` (tiny, small, 671b).
* :mod:`models.deepseek_v3.model`: :class:`DeepSeekV3`, :func:`loss`.
* :mod:`models.deepseek_v3.pipeline`: the functional pieces for
  ``jaxinfra.pipeline.pipeline_step`` (:func:`pipeline_parts`).
"""

from models.deepseek_v3.config import CONFIGS, Config, get_config
from models.deepseek_v3.model import DeepSeekV3, ModelOutput, build, loss

__all__ = ["CONFIGS", "Config", "DeepSeekV3", "ModelOutput", "build", "get_config", "loss"]
