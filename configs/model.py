"""Model-only config: a preset plus mesh and sharding rules.

  --config=configs/model.py            # tiny
  --config=configs/model.py:bench56m   # any preset name in wakea_jax.models.config.PRESETS
  --config.model.num_layers=4 --config.mesh.tensor=2
  --config.model.scan_layers=true      # layers stacked and run under one lax.scan
"""

from wakea_jax import config_files

common = config_files.sibling(__file__, "common")


def get_config(arg=None):
  config = common.base_config()
  config.preset = arg or "tiny"
  config.model = common.model_config_dict(config.preset)
  return config
