"""runtime.py: the compilation cache's location and off switch, the XLA:CPU flags, set-up errors."""

import os

import pytest

from unet_flax import errors
from unet_flax import runtime


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
  monkeypatch.setenv('UNET_FLAX_CACHE', str(tmp_path))
  assert runtime.compilation_cache_dir() == tmp_path
  monkeypatch.setenv('UNET_FLAX_CACHE', '')
  assert runtime.compilation_cache_dir() is None  # Off: never the current directory.
  monkeypatch.delenv('UNET_FLAX_CACHE')
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  assert runtime.compilation_cache_dir() == tmp_path / 'unet_flax' / 'jax'


def test_xla_cpu_flags_are_those_the_jaxlib_version_knows():
  ynn = '--xla_cpu_experimental_ynn_fusion_type=reduce'
  assert runtime.xla_cpu_flags('0.8.0') == []
  assert runtime.xla_cpu_flags('0.7.9') == []
  for version in ('0.8.1', '0.8.10', '0.9.0rc1', '0.12.0.1', '1.0'):
    assert runtime.xla_cpu_flags(version) == [ynn], version


def test_configure_xla_cpu_adds_our_flags_unless_the_user_set_them(monkeypatch):
  monkeypatch.setattr(runtime, 'xla_cpu_flags', lambda: ['--xla_a=', '--xla_b=1'])
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=2 --xla_b=7')
  runtime.configure_xla_cpu()
  assert os.environ['XLA_FLAGS'] == '--xla_force_host_platform_device_count=2 --xla_b=7 --xla_a='
  monkeypatch.delenv('XLA_FLAGS')
  runtime.configure_xla_cpu()
  assert os.environ['XLA_FLAGS'] == '--xla_a= --xla_b=1'


def test_a_coordinator_needs_the_process_count_and_id(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '')
  with pytest.raises(errors.UserError, match='--coordinator_address needs --num_processes and '
                     '--process_id'):
    runtime.setup('127.0.0.1:1234', None, 0)


def test_our_xla_flags_put_reductions_on_ynnpack_and_keep_convolutions_off_it():
  # The session's XLA_FLAGS are runtime.configure_xla_cpu's (tests/conftest.py).
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from unet_flax import layers  # pylint: disable=g-import-not-at-top
  if jax.default_backend() != 'cpu':
    pytest.skip('XLA:CPU flags')
  x = jnp.ones((2, 16, 16, 8), jnp.bfloat16)
  pool = jax.jit(layers.max_pool_2x2).lower(x).compile().as_text()
  assert '__ynn_fusion' in pool
  kernel = jnp.ones((3, 3, 8, 4), jnp.bfloat16)
  conv = jax.jit(lambda x, k: layers.xla_layer(x, k, None, 'SAME')).lower(x, kernel)
  text = conv.compile().as_text()
  assert 'convolution(' in text and '__ynn_fusion' not in text
