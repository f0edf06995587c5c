"""Sampling pipelines: text-to-video (and Video LDM's cascade with a latent upsampler) and SVD
image-to-video, from vldm components or diffusers folders. Each `__call__` returns frames
[B,F,H,W,3] in [0,1]; see the modules for the details."""

from vldm.pipelines.cascade import CascadePipeline
from vldm.pipelines.common import PipelineError, SamplerSettings, write_clips
from vldm.pipelines.image_to_video import ImageToVideoPipeline
from vldm.pipelines.long_video import LongVideoPipeline
from vldm.pipelines.text_to_video import TextToVideoPipeline
from vldm.pipelines.workdir import (
    TrainedStage,
    find_trained_stages,
    pipeline_from_components,
    pipeline_from_workdir,
)
