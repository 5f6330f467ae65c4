"""The images offered to users, from the configuration alone (``vmbatch images``).

Users on a login node have no libvirt access and cannot read the node's image cache; what
they need is which names a job may give in ``#VMBATCH image=NAME``, which one is used
without that line, and what each is. That follows from ``[batch].default_image``,
``[batch].user_images`` and each catalog entry, so it is read from the configuration only
(world-readable ``/etc/vmbatch``; it holds no secret). The same list renders as a text
table, JSON, Markdown or HTML, so an admin can publish it as a page
(docs/operator.md, "The images users see").
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass

from vmbatch.config import Config, ImageConfig

FORMATS = ("text", "json", "markdown", "html")


@dataclass(frozen=True, slots=True)
class Offered:
    """One image as users see it."""

    name: str
    #: Used when the job names no image.
    default: bool
    #: A batch job may ask for it (``#VMBATCH image=NAME``); False: only ``vmbatch run``.
    batch: bool
    description: str
    #: How the guest boots: "kernel" (the site's kernel) or "disk" (its own bootloader).
    boot: str
    context: str


def _offered(cfg: Config, img: ImageConfig, *, batch: bool) -> Offered:
    return Offered(
        name=img.name,
        default=img.name == cfg.batch.default_image,
        batch=batch,
        description=img.description,
        boot="kernel" if img.kernel is not None else "disk",
        context=img.context,
    )


def offered(cfg: Config, *, everything: bool = False) -> list[Offered]:
    """The default image first, then the others users may choose, by name; with
    ``everything``, also the catalog images batch jobs may not choose."""
    allowed = {cfg.batch.default_image, *cfg.batch.user_images} - {""}
    names = sorted(cfg.images, key=lambda n: (n != cfg.batch.default_image, n))
    return [
        _offered(cfg, cfg.images[n], batch=n in allowed)
        for n in names
        if everything or n in allowed
    ]


def render(images: list[Offered], fmt: str) -> str:
    """``images`` as ``fmt`` (one of :data:`FORMATS`), ending in a newline."""
    if fmt == "json":
        return json.dumps([asdict(i) for i in images], indent=2, sort_keys=True) + "\n"
    rows = [_row(i) for i in images]
    head = ("IMAGE", "HOW TO USE", "DESCRIPTION")
    if fmt == "markdown":
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += [
            "| " + " | ".join(html.escape(c, quote=False).replace("|", "\\|") for c in r) + " |"
            for r in rows
        ]
        return "\n".join(out) + "\n"
    if fmt == "html":
        cells = "".join(f"<th>{html.escape(h.capitalize())}</th>" for h in head)
        out = ['<table class="vmbatch-images">', f"<tr>{cells}</tr>"]
        for r in rows:
            out.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>")
        return "\n".join([*out, "</table>"]) + "\n"
    if fmt != "text":
        raise ValueError(f"unknown format {fmt!r}")
    widths = [max(len(h), *(len(r[k]) for r in rows)) for k, h in enumerate(head)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [head, *rows]
    ]
    return "\n".join(lines) + "\n"


def _row(i: Offered) -> tuple[str, str, str]:
    if i.default:
        use = "default (no #VMBATCH line)"
    elif i.batch:
        use = f"#VMBATCH image={i.name}"
    else:
        use = f"vmbatch run --image {i.name}"
    return (i.name, use, i.description or "-")
