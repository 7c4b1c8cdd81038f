"""The benchmark's PNG chart, drawn with PIL: per bucket, one bar per contestant for the median end-to-end
latency and one for the median transformer step, with a p90 whisker and the ratio to the baseline."""

from __future__ import annotations

from typing import Any

from PIL import Image, ImageDraw, ImageFont

WIDTH = 1200
ROW = 22
LABEL_W = 200
PANEL_GAP = 40
MARGIN = 16
PALETTE = (
    (90, 90, 90),
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (188, 189, 34),
    (23, 190, 207),
)
PANELS = (
    ("total", "end to end, median ms (p90 whisker)", "ratio_total"),
    ("step", "transformer step, median ms (p90 whisker)", "ratio_step"),
)


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def draw_latency_chart(run_rec: dict[str, Any], records: list[dict[str, Any]]) -> Image.Image:
    """A white PNG-ready image; bars scale per panel to the slowest p90 among all buckets."""
    measured = [r for r in records if r["stages"]["total"] is not None]
    bucket_names = list(dict.fromkeys(r["bucket"] for r in records))
    contestants = list(dict.fromkeys(r["contestant"] for r in records))
    colour = {c: PALETTE[i % len(PALETTE)] for i, c in enumerate(contestants)}
    rows = sum(1 + sum(1 for r in records if r["bucket"] == b) for b in bucket_names)
    height = MARGIN * 3 + 2 * ROW + rows * ROW
    img = Image.new("RGB", (WIDTH, height), "white")
    d = ImageDraw.Draw(img)
    font = _font()
    title = (
        f"kontext bench - {run_rec['model']} on {run_rec['device']} ({run_rec['dtype']}, "
        f"{run_rec['steps']} steps, {run_rec['repeats']} rounds)"
    )
    d.text((MARGIN, MARGIN), title, fill="black", font=font)
    panel_w = (WIDTH - LABEL_W - 2 * MARGIN - PANEL_GAP) // 2
    x0s = [MARGIN + LABEL_W, MARGIN + LABEL_W + panel_w + PANEL_GAP]
    top = MARGIN + 2 * ROW
    for (_, label, _), x0 in zip(PANELS, x0s, strict=True):
        d.text((x0, top - ROW), label, fill="black", font=font)
    scale = {
        stage: max((r["stages"][stage]["p90_s"] for r in measured if r["stages"][stage]), default=1.0)
        for stage, _, _ in PANELS
    }
    y = top
    for b in bucket_names:
        d.text((MARGIN, y + 4), f"bucket {b}", fill="black", font=font)
        d.line((MARGIN, y + ROW - 2, WIDTH - MARGIN, y + ROW - 2), fill=(200, 200, 200))
        y += ROW
        for r in (r for r in records if r["bucket"] == b):
            d.text((MARGIN + 8, y + 5), r["contestant"][:30], fill="black", font=font)
            for (stage, _, ratio_key), x0 in zip(PANELS, x0s, strict=True):
                _bar(
                    d, font, r, stage, ratio_key, x0, y, panel_w, scale[stage] or 1.0, colour[r["contestant"]]
                )
            y += ROW
    return img


def _bar(
    d: ImageDraw.ImageDraw,
    font: Any,
    r: dict[str, Any],
    stage: str,
    ratio_key: str,
    x0: int,
    y: int,
    panel_w: int,
    full: float,
    colour: tuple[int, int, int],
) -> None:
    stat = r["stages"][stage]
    if stat is None:
        d.text((x0, y + 5), "-" if not r["skipped"] else "skipped", fill=(120, 120, 120), font=font)
        return
    usable = panel_w - 110  # room for the value text
    med = int(usable * stat["median_s"] / full)
    p90 = int(usable * stat["p90_s"] / full)
    d.rectangle((x0, y + 4, x0 + max(med, 1), y + ROW - 4), fill=colour)
    d.line((x0 + med, y + ROW // 2, x0 + p90, y + ROW // 2), fill="black")
    d.line((x0 + p90, y + 6, x0 + p90, y + ROW - 6), fill="black")
    ratio = r.get(ratio_key)
    text = f"{1000 * stat['median_s']:.1f}" + ("" if ratio is None else f"  {ratio:.2f}x")
    d.text((x0 + max(p90, med) + 6, y + 5), text, fill="black", font=font)
