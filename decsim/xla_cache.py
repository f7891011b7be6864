"""JAX's persistent compilation cache, on by default for the command lines.

A run's rounds compile once per configuration: a second run of the same
configuration (another seed, more rounds, a sweep point that differs only in
values the program takes as inputs) loads the compiled program from the cache
instead of compiling it again. The cache is keyed by the program, the XLA flags
and the device, so a stale entry is never used for a different program.

``--compilation_cache=DIR`` moves it; ``--compilation_cache=`` turns it off. The
default is ``$JAX_COMPILATION_CACHE_DIR`` when set, else
``$XDG_CACHE_HOME/decsim/xla`` (``~/.cache/decsim/xla``). Runs sharing the cache
at once are safe: with a size limit JAX guards the directory with a file lock,
and the least recently used entries are evicted past ``MAX_BYTES``.
"""

import os

import jax
from jax.experimental.compilation_cache import compilation_cache

from decsim.errors import ConfigError

MAX_BYTES = 4 * 2 ** 30
MIN_COMPILE_SECONDS = 0.1  # smaller programs compile faster than they load


def default_dir() -> str:
  if os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    return os.environ['JAX_COMPILATION_CACHE_DIR']
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'decsim', 'xla')


def enable(directory: str) -> str | None:
  """Turns the cache on in ``directory`` (made if missing); '' turns it off. Returns the
  absolute directory, or None when off. Takes effect from the next compilation."""
  compilation_cache.reset_cache()  # JAX opens its cache once, at the first compilation
  if not directory:
    jax.config.update('jax_enable_compilation_cache', False)
    return None
  path = os.path.abspath(os.path.expanduser(directory))
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise ConfigError(f'--compilation_cache={directory} cannot be made ({e.strerror}): pass a '
                      'writable directory, or an empty value to turn the cache off') from None
  jax.config.update('jax_enable_compilation_cache', True)
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', MIN_COMPILE_SECONDS)
  jax.config.update('jax_compilation_cache_max_size', MAX_BYTES)
  return path
