"""python -m vldm.curate --input DIR --out OUT [--config FILE] [--config.KEY=VALUE ...]

Cuts the videos of DIR into clips, scores them (motion always; CLIP score, aesthetics and text
area when their weights are given) and filters them; writes OUT/clips.jsonl (one JSON object per
clip: file, start_frame, end_frame, fps, caption(s), captioners where the captions file names
them, the scores, kept, dropped_by) and OUT/report.html. The default config is
configs/curate.py. Rerunning with the same OUT resumes. See vldm.curate.pipeline.
--config.export.mode=copy (keyframe-aware stream copy) or reencode also cuts the kept clips into
files under OUT/clips/ (see vldm.curate.ffmpeg_cuts).
"""

import importlib.util
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from vldm.train import config_lib


def _default_config():
  """configs/curate.py of this checkout, or of the installed `configs` package."""
  here = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "curate.py")
  if os.path.isfile(here):
    return os.path.normpath(here)
  spec = importlib.util.find_spec("configs.curate")
  return spec.origin if spec else "configs/curate.py"


_CONFIG = config_flags.DEFINE_config_file(
    "config", _default_config(), "Curation config file (FILE.py).", lock_config=True
)
_INPUT = flags.DEFINE_string("input", None, "Folder of videos (and captions.csv / .jsonl).")
_OUT = flags.DEFINE_string("out", None, "Output folder: clips.jsonl, report.html, score files.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not _INPUT.value or not _OUT.value:
    raise app.UsageError("--input (a folder of videos) and --out (an output folder) are required.")
  from vldm.convert import core  # pylint: disable=g-import-not-at-top
  from vldm.curate import pipeline  # pylint: disable=g-import-not-at-top

  try:
    result = pipeline.run(_CONFIG.value, _INPUT.value, _OUT.value)
  except (pipeline.CurationError, core.ConversionError, ValueError, FileNotFoundError) as e:
    sys.exit(f"vldm.curate: error: {e}")
  if result is not None:
    rows = result["rows"]
    logging.info("vldm.curate: %d clips, %d kept", len(rows), sum(r["kept"] for r in rows))
    print(
        f"{len(rows)} clips, {sum(r['kept'] for r in rows)} kept: "
        f"{os.path.join(_OUT.value, pipeline.CLIPS_FILE)}"
    )
    if result.get("export"):
      e = result["export"]
      print(
          f"{e['exported'] + e['reused']} clip files ({e['mode']}; {e['reused']} kept from an "
          f"earlier run, {sum(e['skipped'].values())} skipped): "
          f"{os.path.join(_OUT.value, 'clips')}"
      )


if __name__ == "__main__":
  app.run(main, flags_parser=config_lib.parse_flags)
