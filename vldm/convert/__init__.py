"""Weight import and export for diffusers / transformers model folders.

`load_diffusers(path) -> (module, params)` and `save_diffusers(module, params, path)`; the class
of a folder comes from its config.json. Each model family registers its format on import.
"""
from vldm.convert.core import ConversionError
from vldm.convert.registry import load_diffusers, save_diffusers, supported_classes

# Registering imports: each module adds its classes to the registry.
from vldm.convert import autoencoder as _autoencoder  # noqa: F401,E402
from vldm.convert import clip as _clip  # noqa: F401,E402
from vldm.convert import unet as _unet  # noqa: F401,E402
