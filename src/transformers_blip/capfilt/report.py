"""The report of a CapFilt run: what was kept and removed, how the filter scored, how well it found the noise.

`write_report` reads a finished run's scores and writes, into a folder:

- `index.html`: the kept fractions, the skips, on data with known noise (the synthetic benchmark's hidden
  `is_noisy` flags) the filter's precision and recall, a histogram of ITM match probabilities, and sample images
  beside their web and synthetic captions, kept in green and removed in red, as in the paper's figure 4;
- `report.png`: the same page drawn with PIL (no browser needed), `histogram.png`, and the sample images.
"""

from __future__ import annotations

import html
import io
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from ..atomic_writes import write_bytes_atomically, write_text_atomically
from ..data.bootstrapped import read_capfilt_manifest
from ..data.decoding import load_image
from ..data.skips import BadSampleError, SkipReport
from .bootstrap import InputShard, iter_scores

KEPT_COLOUR = (22, 130, 50)  # green
REMOVED_COLOUR = (200, 30, 30)  # red
SOURCE_COLOURS = {"web": (60, 110, 200), "synthetic": (235, 140, 30)}
_THUMBNAIL = 128
_HISTOGRAM_SIZE = (640, 300)


@dataclass
class FilterQuality:
    """The filter against known noise, over web captions: a removed caption is a prediction of "noisy"."""

    precision: float
    recall: float
    removed: int
    noisy: int
    removed_noisy: int


def filter_quality(scores: Sequence[Mapping[str, Any]], noisy_keys: Mapping[str, bool]) -> FilterQuality:
    """Precision and recall of the removal of web captions against `noisy_keys` (image key -> caption is noisy)."""
    web = [score for score in scores if score["source"] == "web" and score["key"] in noisy_keys]
    removed = [score for score in web if not score["kept"]]
    noisy = [score for score in web if noisy_keys[score["key"]]]
    removed_noisy = sum(noisy_keys[score["key"]] for score in removed)
    return FilterQuality(
        precision=removed_noisy / len(removed) if removed else 0.0,
        recall=removed_noisy / len(noisy) if noisy else 0.0,
        removed=len(removed),
        noisy=len(noisy),
        removed_noisy=removed_noisy,
    )


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default()


def draw_histogram(scores: Sequence[Mapping[str, Any]], threshold: float, bins: int = 20) -> Image.Image:
    """Bars of how many web and synthetic texts fall in each ITM probability bin, the threshold as a line."""
    width, height = _HISTOGRAM_SIZE
    left, right, top, bottom = 50, 20, 30, 40
    counts = {source: [0] * bins for source in SOURCE_COLOURS}
    for score in scores:
        counts[score["source"]][min(int(score["itm_score"] * bins), bins - 1)] += 1
    tallest = max(1, *(max(values) for values in counts.values()))
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = _font(11)
    plot_width, plot_height = width - left - right, height - top - bottom
    bin_width = plot_width / bins
    for offset, (source, values) in enumerate(counts.items()):
        for index, count in enumerate(values):
            x0 = left + index * bin_width + offset * bin_width / 2
            bar_height = plot_height * count / tallest
            draw.rectangle([x0 + 1, top + plot_height - bar_height, x0 + bin_width / 2 - 1, top + plot_height],
                           fill=SOURCE_COLOURS[source])  # fmt: skip
        draw.text((left + 10 + offset * 110, 8), f"■ {source}", fill=SOURCE_COLOURS[source], font=font)
    draw.line([left, top + plot_height, left + plot_width, top + plot_height], fill="black")
    draw.line([left, top, left, top + plot_height], fill="black")
    threshold_x = left + plot_width * threshold
    draw.line([threshold_x, top, threshold_x, top + plot_height], fill=REMOVED_COLOUR, width=2)
    draw.text((threshold_x + 3, top), f"threshold {threshold:g}", fill=REMOVED_COLOUR, font=font)
    for tick in range(0, 11, 2):
        x = left + plot_width * tick / 10
        draw.text((x - 8, top + plot_height + 4), f"{tick / 10:.1f}", fill="black", font=font)
    draw.text((left + plot_width / 2 - 80, height - 18), "ITM match probability", fill="black", font=font)
    draw.text((4, top - 4), f"{tallest}", fill="black", font=font)
    draw.text((4, top + plot_height - 12), "0", fill="black", font=font)
    return image


def _sample_keys(scores: Sequence[Mapping[str, Any]], count: int) -> list[str]:
    """Images to show: first those with a kept and a removed text, then any, in input order."""
    by_key: dict[str, list[bool]] = {}
    for score in scores:
        by_key.setdefault(score["key"], []).append(score["kept"])
    mixed = [key for key, kept in by_key.items() if any(kept) and not all(kept)]
    rest = [key for key in by_key if key not in mixed]
    return (mixed + rest)[:count]


def _sample_images(shards: Sequence[InputShard], keys: Sequence[str]) -> dict[str, Image.Image]:
    """The decoded images of `keys`, read from the input shards (stopping when all are found)."""
    wanted, found = set(keys), {}
    for shard in shards:
        for row in shard.rows(SkipReport()):
            if row["key"] in wanted:
                try:
                    found[row["key"]] = load_image(row["image"])
                except BadSampleError:
                    continue
        if len(found) == len(wanted):
            break
    return found


def _thumbnail(image: Image.Image) -> Image.Image:
    scale = _THUMBNAIL / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.NEAREST if scale > 1 else Image.Resampling.BICUBIC)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _summary_lines(manifest: dict[str, Any], quality: FilterQuality | None) -> list[str]:
    totals, settings = manifest["totals"], manifest["settings"]
    lines = [f"{totals['images']} images, {totals['records']} (image, text) records kept"]
    for source in ("web", "synthetic"):
        scored, kept = totals["texts_scored"][source], totals["texts_kept"][source]
        share = kept / scored if scored else 0.0
        lines.append(f"{source} texts kept: {kept} of {scored} ({share:.1%})")
    lines.append(
        f"threshold {settings['threshold']:g}, {settings['num_captions']} synthetic caption(s) per image by "
        f"{settings['decoding']}" + (f" (top-p {settings['top_p']:g})" if settings["decoding"] == "nucleus" else "")
    )
    reasons: dict[str, int] = {}
    for entry in _skipped_entries(manifest):
        reasons[entry["reason"]] = reasons.get(entry["reason"], 0) + 1
    skipped = ", ".join(f"{count} {reason}" for reason, count in sorted(reasons.items()))
    lines.append(f"skipped: {skipped or 'none'}")
    if quality is not None:
        lines.append(
            f"filter vs. the hidden noise flags (web captions): precision {quality.precision:.1%} "
            f"({quality.removed_noisy} of {quality.removed} removed were noisy), recall {quality.recall:.1%} "
            f"({quality.removed_noisy} of {quality.noisy} noisy were removed)"
        )
    return lines


_SKIPS_LISTED = 50


def _skipped_entries(manifest: dict[str, Any]) -> list[dict[str, str]]:
    return [entry for shard in manifest["shards"] for entry in shard["skipped"]]


def _html_page(
    lines: list[str], samples: list[tuple[str, str, list[Mapping[str, Any]]]], skipped: list[dict[str, str]]
) -> str:
    rows = []
    for key, image_file, texts in samples:
        captions = "".join(
            f'<li class="{"kept" if t["kept"] else "removed"}">[{t["source"]}] {html.escape(t["text"])} '
            f"<small>(ITM {t['itm_score']:.3f}, ITC {t['itc_similarity']:.3f})</small></li>"
            for t in texts
        )
        image = f'<img src="{image_file}" alt="{html.escape(key)}">' if image_file else "(image unavailable)"
        rows.append(f"<tr><td>{image}<br><small>{html.escape(key)}</small></td><td><ul>{captions}</ul></td></tr>")
    summary = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
    skips = "".join(
        f"<li>{html.escape(entry['source'])}: {html.escape(entry['reason'])}</li>" for entry in skipped[:_SKIPS_LISTED]
    )
    more = (
        f"<p>and {len(skipped) - _SKIPS_LISTED} more (every shard-*.json lists its own)</p>"
        if len(skipped) > _SKIPS_LISTED
        else ""
    )
    green, red = (f"rgb{colour}" for colour in (KEPT_COLOUR, REMOVED_COLOUR))
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>CapFilt report</title>
<style>body{{font-family:sans-serif}} .kept{{color:{green}}} .removed{{color:{red};text-decoration:line-through}}
td{{vertical-align:top;padding:6px}} img{{image-rendering:pixelated}}</style></head>
<body><h1>CapFilt report</h1><ul>{summary}</ul>
<h2>ITM match probabilities</h2><img src="histogram.png" alt="histogram of ITM match probabilities">
<h2>Samples</h2><p><span class="kept">kept</span>, <span class="removed">removed</span></p>
<table>{"".join(rows)}</table>
<h2>Skipped</h2><ul>{skips or "<li>nothing</li>"}</ul>{more}</body></html>
"""


def _wrapped(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) or [""]


def _page_image(
    lines: list[str], histogram: Image.Image, samples: list[tuple[str, Image.Image | None, list]]
) -> Image.Image:
    """The report as one picture: the summary, the histogram, then one row per sample."""
    width, line_height, font = 900, 16, _font(12)
    summary_lines = [part for line in lines for part in _wrapped(line, 120)]
    row_heights = [max(_THUMBNAIL, line_height * sum(len(_wrapped(t["text"], 80)) for t in texts)) + 10
                   for _, _, texts in samples]  # fmt: skip
    height = 40 + line_height * len(summary_lines) + histogram.height + 20 + sum(row_heights) + 20
    page = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(page)
    draw.text((10, 8), "CapFilt report", fill="black", font=_font(18))
    y = 36
    for line in summary_lines:
        draw.text((10, y), line, fill="black", font=font)
        y += line_height
    page.paste(histogram, (10, y))
    y += histogram.height + 20
    for (_, image, texts), row_height in zip(samples, row_heights):
        if image is not None:
            page.paste(_thumbnail(image), (10, y))
        text_y = y
        for text in texts:
            colour = KEPT_COLOUR if text["kept"] else REMOVED_COLOUR
            for part in _wrapped(f"[{text['source']}] {text['text']} (ITM {text['itm_score']:.2f})", 80):
                draw.text((_THUMBNAIL + 24, text_y), part, fill=colour, font=font)
                text_y += line_height
        y += row_height
    return page


def write_report(
    output_dir: str | os.PathLike,
    shards: Sequence[InputShard],
    report_dir: str | os.PathLike | None = None,
    num_samples: int = 8,
    noisy_keys: Mapping[str, bool] | None = None,
    notes: Sequence[str] = (),
) -> Path:
    """Write the report of the finished run in `output_dir` (into `report_dir`, by default `output_dir/report`).

    Args:
        shards: the run's input shards, where the sample images are read from (a removed text's image is in no
            output file).
        num_samples: images shown with their captions.
        noisy_keys: image key -> whether its web caption is noise, where that is known (the synthetic benchmark's
            `is_noisy`): adds the filter's precision and recall.
        notes: lines added to the summary (e.g. what the loaders skipped before the run).

    Returns:
        The path of `index.html`.
    """
    manifest = read_capfilt_manifest(output_dir)
    report_dir = Path(report_dir) if report_dir is not None else Path(output_dir) / "report"
    scores = list(iter_scores(output_dir))
    quality = filter_quality(scores, noisy_keys) if noisy_keys else None
    lines = _summary_lines(manifest, quality) + list(notes)
    histogram = draw_histogram(scores, manifest["settings"]["threshold"])
    write_bytes_atomically(report_dir / "histogram.png", _png(histogram))

    keys = _sample_keys(scores, num_samples)
    images = _sample_images(shards, keys)
    texts_of = {key: [score for score in scores if score["key"] == key] for key in keys}
    html_samples, page_samples = [], []
    for number, key in enumerate(keys):
        image_file = None
        if key in images:
            image_file = f"images/sample-{number:02d}.png"
            write_bytes_atomically(report_dir / image_file, _png(_thumbnail(images[key])))
        html_samples.append((key, image_file, texts_of[key]))
        page_samples.append((key, images.get(key), texts_of[key]))
    write_bytes_atomically(report_dir / "report.png", _png(_page_image(lines, histogram, page_samples)))
    summary = {"lines": lines, "filter_quality": quality.__dict__ if quality else None}
    write_text_atomically(report_dir / "summary.json", json.dumps(summary, indent=1) + "\n")
    return write_text_atomically(
        report_dir / "index.html", _html_page(lines, html_samples, _skipped_entries(manifest))
    )


__all__ = ["FilterQuality", "draw_histogram", "filter_quality", "write_report"]
