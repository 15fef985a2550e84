"""The persistent compilation cache's location and its off switch."""

from unet_flax import runtime


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
  monkeypatch.setenv('UNET_FLAX_CACHE', str(tmp_path))
  assert runtime.compilation_cache_dir() == tmp_path
  monkeypatch.setenv('UNET_FLAX_CACHE', '')
  assert runtime.compilation_cache_dir() is None  # Off: never the current directory.
  monkeypatch.delenv('UNET_FLAX_CACHE')
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
  assert runtime.compilation_cache_dir() == tmp_path / 'unet_flax' / 'jax'
