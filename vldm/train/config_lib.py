"""Loading config files outside absl (notebooks, tests) and explaining unknown config keys."""
from __future__ import annotations

import difflib
import importlib.util
import os
import sys
from typing import Iterable

from absl import flags


def ensure_importable(config_path: str) -> None:
  """Lets a config file `import configs.common`: puts the folder holding `configs/` on sys.path."""
  folder = os.path.dirname(os.path.abspath(config_path))
  if os.path.basename(folder) == "configs":
    root = os.path.dirname(folder)
    if root not in sys.path:
      sys.path.insert(0, root)


def load_config(spec: str, overrides: dict | None = None):
  """The locked config of 'path/to/file.py[:arg]', with dotted-key `overrides` applied."""
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise FileNotFoundError(f"Config file {path!r} does not exist.")
  ensure_importable(path)
  module_spec = importlib.util.spec_from_file_location("vldm_config_file", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  config.lock()
  for key, value in (overrides or {}).items():
    check_keys(config, [key])
    parent, _, leaf = key.rpartition(".")
    target = config
    for part in filter(None, parent.split(".")):
      target = target[part]
    target[leaf] = value
  return config


def _all_keys(config, prefix: str = "") -> list[str]:
  keys = []
  for key, value in config.items():
    name = prefix + key
    keys.append(name)
    if hasattr(value, "items") and hasattr(value, "lock"):
      keys += _all_keys(value, name + ".")
  return keys


def unknown_key_error(config, key: str) -> str | None:
  """None if `key` (dotted) exists in `config`, else a message naming the closest valid keys."""
  node = config
  for part in key.split("."):
    if not (hasattr(node, "keys") and part in node.keys()):
      close = difflib.get_close_matches(key, _all_keys(config), n=3, cutoff=0.0)
      return f"Unknown config key {key!r}; the closest valid keys are: {', '.join(close)}."
    node = node[part]
  return None


def check_keys(config, keys: Iterable[str]) -> None:
  """Raises ValueError naming the closest valid keys for the first unknown dotted key."""
  for key in keys:
    message = unknown_key_error(config, key)
    if message:
      raise ValueError(message)


def override_keys(argv: Iterable[str], flag: str = "config") -> list[str]:
  """The dotted keys of `--config.KEY=VALUE` (or `--noconfig.KEY`) arguments."""
  keys = []
  for arg in argv:
    name = arg.lstrip("-").split("=", 1)[0]
    for prefix in (flag + ".", "no" + flag + "."):
      if arg.startswith("-") and name.startswith(prefix):
        keys.append(name[len(prefix):])
  return keys


def _config_spec(argv):
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def parse_flags(argv):
  """absl flag parsing for the command lines that take `--config FILE[:arg]` (train, data, sample):
  config files can `from configs import common`, and unknown config keys are explained."""
  spec = _config_spec(argv)
  if spec:  # the config file may `from configs import common`
    path = spec.split(":", 1)[0]
    if not os.path.exists(path):
      sys.exit(f"FATAL config error: the config file {path!r} does not exist.")
    ensure_importable(path)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"FATAL flags error: {e}\nPass --helpshort or --helpfull to see help on flags.")
  except (AttributeError, KeyError) as e:  # how ml_collections reports an unknown override
    message = str(e)
    try:
      config = load_config(spec)
      message = next(filter(None, (unknown_key_error(config, key)
                                   for key in override_keys(argv))), message)
    except Exception:  # pylint: disable=broad-except  # keep ml_collections' own message
      pass
    sys.exit(f"FATAL config error: {message}")
