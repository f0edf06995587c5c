"""Weight import and export for diffusers / transformers model folders, and vldm's own formats.

`load_diffusers(path) -> (module, params)` and `save_diffusers(module, params, path)`; the class
of a folder comes from its config.json. Each model family registers its format on import.
`export_class_of(module)` says which class `save_diffusers` writes: the diffusers / transformers
class when it describes the module exactly, else vldm's own ('VldmUNet', see `native`).
Temporal layers alone ("motion module" files): `save_temporal_layers`, `load_temporal_layers`,
`apply_temporal_layers`, `attach_temporal_layers` (see `temporal`). AnimateDiff: `load_diffusers`
reads UNetMotionModel folders; `load_animatediff(unet_dir, adapter_dir)` /
`attach_motion_adapter` put a MotionAdapter on an image UNet, `save_motion_adapter` writes one
(see `animatediff`). ModelScope / ZeroScope: `load_diffusers` reads UNet3DConditionModel folders
(see `modelscope`). LoRA files (PEFT / diffusers / kohya): `apply_lora(params, path, scale=1.0,
*, module=None)` fuses one into a UNet / text encoder, `save_lora` writes vldm adapters as
diffusers' LoRA file (see `lora`, docs/lora.md).
"""

from vldm.convert.animatediff import (
    attach_motion_adapter,
    load_animatediff,
    save_motion_adapter,
)
from vldm.convert.core import ConversionError
from vldm.convert.lora import apply_lora, read_lora, save_lora
from vldm.convert.registry import export_class_of, load_diffusers, save_diffusers, supported_classes
from vldm.convert.temporal import (
    apply_temporal_layers,
    attach_temporal_layers,
    load_temporal_layers,
    save_temporal_layers,
    temporal_layers_metadata,
)

# Registering imports: each module adds its classes to the registry.
from vldm.convert import autoencoder as _autoencoder  # noqa: F401,E402
from vldm.convert import clip as _clip  # noqa: F401,E402
from vldm.convert import unet as _unet  # noqa: F401,E402
from vldm.convert import native as _native  # noqa: F401,E402
from vldm.convert import modelscope as _modelscope  # noqa: F401,E402
