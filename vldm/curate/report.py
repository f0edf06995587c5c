"""`OUT/report.html`: counts, a histogram of each score with its filter's threshold, and contact
sheets of kept and dropped clips per filter. Self-contained HTML; the images are PNG files beside
it (drawn with numpy, written with `vldm.video_io.write_png`), under `OUT/report/`.
"""

import html
import os

import numpy as np

from vldm import video_io

HIST_BINS = 40
HIST_HEIGHT = 120
LABEL_HEIGHT = 26  # the numbers under a histogram: range ends, and the threshold below them
BAR_WIDTH = 6
REPORT_FILE = "report.html"
SHEET_CLIPS = 8  # clips per contact sheet (lowest-scoring dropped, highest-scoring kept)


def histogram_image(values, threshold=None, lo=None, hi=None):
  """A bar chart (uint8 [H, W, 3]) of `values` over HIST_BINS bins; the threshold as a red line;
  the range and threshold written under it."""
  values = np.asarray(values, np.float64)
  lo = float(values.min()) if lo is None else lo
  hi = float(values.max()) if hi is None else hi
  if hi <= lo:
    hi = lo + 1.0
  counts, _ = np.histogram(values, HIST_BINS, (lo, hi))
  width = HIST_BINS * BAR_WIDTH
  image = np.full((HIST_HEIGHT, width, 3), 255, np.uint8)
  heights = np.round(counts / max(counts.max(), 1) * (HIST_HEIGHT - 4)).astype(int)
  for i, h in enumerate(heights):
    if h:
      image[HIST_HEIGHT - h :, i * BAR_WIDTH : (i + 1) * BAR_WIDTH - 1] = (70, 110, 170)
  if threshold is not None and lo <= threshold <= hi:
    x = min(int(round((threshold - lo) / (hi - lo) * width)), width - 1)
    image[:, max(x - 1, 0) : x + 1] = (220, 30, 30)
  image[-1] = 0  # axis
  return _with_labels(image, lo, hi, threshold, int(counts.max()))


def _with_labels(plot, lo, hi, threshold, max_count):
  """The plot with a strip of numbers under it (range ends, threshold) and the tallest bar's count
  in its corner, drawn with PIL's built-in font."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top

  height, width = plot.shape[:2]
  canvas = Image.new("RGB", (width, height + LABEL_HEIGHT), (255, 255, 255))
  canvas.paste(Image.fromarray(plot), (0, 0))
  draw = ImageDraw.Draw(canvas)
  draw.text((2, 1), f"max {max_count} clips/bin", fill=(90, 90, 90))
  y = height + 2
  draw.text((1, y), f"{lo:.3g}", fill=(0, 0, 0))
  right = f"{hi:.3g}"
  draw.text((width - 1 - draw.textlength(right), y), right, fill=(0, 0, 0))
  if threshold is not None and lo <= threshold <= hi:
    label = f"{threshold:.3g}"
    x = (threshold - lo) / (hi - lo) * width - draw.textlength(label) / 2
    x = min(max(x, 0), width - draw.textlength(label))
    draw.text((x, y + LABEL_HEIGHT // 2), label, fill=(200, 20, 20))
  return np.asarray(canvas)


def _thumbs(load_thumbs, rows):
  """uint8 [N, 3, S, S, 3] thumbnails (first, middle, last frame) of `rows`."""
  cache = {}
  for row in rows:
    if row["file"] not in cache:
      cache[row["file"]] = load_thumbs(row["file"])
  return np.stack([cache[row["file"]][row["_index"]] for row in rows])


def contact_sheet(thumbs):
  """Clips [N, 3, S, S, 3] → one image, a row per clip (first, middle, last frame)."""
  images = thumbs.reshape((-1,) + thumbs.shape[2:])
  return video_io.tile(images, columns=3)[0]


def write_report(out_dir, rows, records, summary, scores, load_thumbs):
  """Writes OUT/report.html and its PNGs; returns the HTML path.

  rows: the clips (with 'kept', 'dropped_by'); records: the videos' score records; summary: the
  filters' (`pipeline.apply_filters`); scores: the score names, in order; load_thumbs(file):
  the video's thumbnails uint8 [clips, 3, S, S, 3].
  """
  image_dir = os.path.join(out_dir, "report")
  os.makedirs(image_dir, exist_ok=True)
  index = {}
  for record in records:
    for i, clip in enumerate(record.get("clips", ())):
      index[(record["file"], clip["start_frame"])] = i
  for row in rows:
    row["_index"] = index[(row["file"], row["start_frame"])]
  unreadable = [r for r in records if "error" in r]
  e = html.escape
  parts = [
      "<!doctype html><html><head><meta charset='utf-8'><title>vldm.curate report</title>",
      "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
      "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
      "img{image-rendering:pixelated;border:1px solid #ccc}</style></head><body>",
      "<h1>Curation report</h1><h2>Counts</h2><table>",
  ]
  counts = [
      ("videos", len(records)),
      ("unreadable videos", len(unreadable)),
      ("clips", len(rows)),
      ("kept clips", sum(r["kept"] for r in rows)),
  ]
  counts += [(f"dropped by {name}", s["dropped"]) for name, s in summary.items()]
  parts += [f"<tr><th>{e(k)}</th><td>{v}</td></tr>" for k, v in counts]
  parts.append("</table>")
  parts.append(_timings_table(records))
  if unreadable:
    parts.append("<h2>Unreadable videos</h2><ul>")
    parts += [f"<li>{e(r['file'])}: {e(r['error'])}</li>" for r in unreadable]
    parts.append("</ul>")
  for name in scores:
    parts += _score_section(name, rows, summary.get(name, {}), image_dir, load_thumbs)
  parts.append("</body></html>")
  for row in rows:
    del row["_index"]
  path = os.path.join(out_dir, REPORT_FILE)
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(parts))
  return path


def _score_section(name, rows, summary, image_dir, load_thumbs):
  """HTML parts for one score: its histogram with the threshold, and contact sheets of the kept
  clips nearest the good end and of the dropped ones nearest the bad end."""
  e = html.escape
  values = [r[name] for r in rows if r.get(name) is not None]
  if not values:
    return []
  threshold = summary.get("threshold")
  high = summary.get("drops") == "high"
  hist = f"hist-{name}.png"
  video_io.write_png(histogram_image(values, threshold), os.path.join(image_dir, hist))
  if summary.get("mode") == "percentile":
    how = f"drops the {summary['percentile']} % with the {'highest' if high else 'lowest'} score"
  else:
    how = f"drops clips {'above' if high else 'below'} the threshold"
  shown = "none" if threshold is None else f"{threshold:.4g}"
  parts = [
      f"<h2>{e(name)}</h2><p>{len(values)} clips, range [{min(values):.4g}, "
      f"{max(values):.4g}]; filter {e(how)}: threshold {shown} (red line), "
      f"{summary.get('dropped', 0)} dropped.</p><img src='report/{hist}'>"
  ]
  scored = sorted((r for r in rows if r.get(name) is not None), key=lambda r: r[name])
  if not high:
    scored = scored[::-1]  # best first
  kept = [r for r in scored if name not in r["dropped_by"]]
  dropped = [r for r in scored if name in r["dropped_by"]][::-1]  # worst first
  for label, group in (("kept", kept), ("dropped", dropped)):
    group = group[:SHEET_CLIPS]
    if not group:
      continue
    sheet = f"sheet-{name}-{label}.png"
    image = contact_sheet(_thumbs(load_thumbs, group))
    video_io.write_png(image, os.path.join(image_dir, sheet))
    listed = ", ".join(f"{r['file']}@{r['start_frame']} ({r[name]:.3g})" for r in group)
    parts.append(f"<h3>{label} by {e(name)}</h3><p>{e(listed)}</p><img src='report/{sheet}'>")
  return parts


def _timings_table(records):
  """Clips per second of each stage, over the videos scored (summed over hosts and reruns)."""
  clips = sum(len(r.get("clips", ())) for r in records)
  totals = {}
  for record in records:
    for stage, seconds in record.get("seconds", {}).items():
      totals[stage] = totals.get(stage, 0.0) + seconds
  if not totals:
    return ""
  rows = "".join(
      f"<tr><th>{html.escape(stage)}</th><td>{seconds:.2f} s</td>"
      f"<td>{clips / max(seconds, 1e-9):.1f} clips/s</td></tr>"
      for stage, seconds in totals.items()
  )
  return f"<h2>Throughput</h2><table>{rows}</table>"
