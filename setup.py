"""vldm: text-to-video latent diffusion (Video LDM / Stable Video Diffusion) in JAX/Flax."""

import setuptools

setuptools.setup(
    name="vldm",
    version="0.1.0",
    description="Text-to-video latent diffusion in JAX/Flax: Video LDM and Stable Video Diffusion.",
    # configs/ too: the demo and the documented commands load configs/*.py, which import
    # `configs.common`, from an installed (non-editable) copy as well.
    packages=setuptools.find_packages(include=["vldm", "vldm.*", "configs"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.7",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "ml_collections>=1.0",
        "absl-py",
        "transformers>=4.40",
        "tensorflow-datasets>=4.9.8",
        "array_record",  # TFDS random-access reads (as_data_source)
        # TFDS builds datasets only with TensorFlow present; the CPU build is enough for data work.
        "tensorflow-cpu>=2.16; platform_machine == 'x86_64'",
        "tensorflow>=2.16; platform_machine != 'x86_64'",
        "importlib_resources",  # needed by TFDS, which does not declare it
        "safetensors>=0.4",
        "numpy",
        "imageio>=2.30",
        "imageio-ffmpeg",  # ships its own ffmpeg binary for MP4
        "opencv-python-headless>=4.8",  # optical flow for clip motion scores (later: curation)
        "scenedetect-headless>=0.7.2,<0.8",  # cut detection (vldm.curate); 0.7 detectors take timecodes
        "pillow",
        "tqdm",
    ],
    extras_require={
        # torch first: `pip install torch==2.13.0` takes the local CPU build (an unpinned one pulls CUDA).
        # jax[tpu] brings libtpu, which compiles for TPU topologies without a TPU (--compile_only).
        # peft: the LoRA parity tests (diffusers' load_lora_weights needs it).
        "test": ["pytest", "torch==2.13.0", "diffusers>=0.35", "peft>=0.17", "jax[tpu]"],
        "tpu": ["jax[tpu]"],
    },
)
