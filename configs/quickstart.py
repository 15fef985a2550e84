"""A small U-Net on the synthetic trimap data set: learns to segment in a few CPU minutes."""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset = 'synthetic_pets/small'
  config.image_size = 64
  config.widths = (16, 32, 64)
  config.dropout_rate = 0.1
  config.batch_size = 16
  config.learning_rate = 2e-3
  config.num_epochs = 14  # 64 steps an epoch: 896 steps in all.
  config.eval_every_epochs = 7
  config.log_every_steps = 64
  return config
