"""Pictures of grounding: the click drawn on the screenshot, and click accuracy per type."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw


def draw_click(image: Image.Image, point: tuple[float, float] | None) -> Image.Image:
    """A copy of the image with a ring and cross at the click (unchanged when None).

    Magenta inside a white halo stays visible on the red, blue and grey of most interfaces.
    """
    picture = image.copy()
    if point is None:
        return picture
    draw = ImageDraw.Draw(picture)
    radius = max(4, round(min(picture.size) * 0.02))
    x, y = point
    for colour, width, pad in (("white", 4, 1), ("magenta", 2, 0)):
        r = radius + pad
        draw.ellipse((x - r, y - r, x + r, y + r), outline=colour, width=width)
        draw.line((x - 2 * r, y, x + 2 * r, y), fill=colour, width=width // 2)
        draw.line((x, y - 2 * r, x, y + 2 * r), fill=colour, width=width // 2)
    return picture


def click_accuracy_chart(scalars: dict[str, float], out_dir: Path) -> list[Path]:
    """Click accuracy overall and per type, as a bar chart (nothing without a box target)."""
    names = sorted(k for k in scalars if k.startswith("click_accuracy"))
    if not names:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    labels = [n.split(".", 1)[1] if "." in n else "all" for n in names]
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 3))
    ax.bar(labels, [scalars[n] for n in names], color="#4c72b0")
    ax.set_ylim(0, 1)
    ax.set_ylabel("click accuracy")
    fig.tight_layout()
    path = out_dir / "click_accuracy.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]
