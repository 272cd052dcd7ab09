"""Input layouts (NCHW, NHWC, features): which axes of one example are channels and space."""

from __future__ import annotations

from typing import Literal, get_args

from interscope_server.errors import InvalidArgument

#: How one example's axes are laid out. NCHW covers (C, H, W) and a channel-less (H, W) image;
#: NHWC is channels-last (H, W, C); features is a tensor of any rank with no spatial meaning.
Layout = Literal["NCHW", "NHWC", "features"]
LAYOUTS: tuple[Layout, ...] = get_args(Layout)


def infer_layout(shape: tuple[int, ...] | list[int]) -> Layout | None:
    """The layout a per-example shape implies, or None when the shape alone cannot tell.

    Rank 1 is features; rank 2 is an (H, W) image, as the service always treated it; rank 3 is
    channels-first or channels-last when exactly one of the first and last axes is strictly
    smaller than both others (a channel axis is short next to the spatial ones), so (3, 32, 32)
    is NCHW and (32, 32, 3) NHWC, while (3, 3, 3) or (8, 4, 4) need the layout declared;
    rank 4 and above can only be features.
    """
    dims = tuple(int(d) for d in shape)
    if not dims:
        return None  # not known yet (a remote model's shape comes from its metadata)
    if len(dims) == 1 or len(dims) >= 4:
        return "features"
    if len(dims) == 2:
        return "NCHW"
    first, middle, last = dims
    channels_first = first < middle and first < last
    channels_last = last < first and last < middle
    if channels_first == channels_last:
        return None
    return "NCHW" if channels_first else "NHWC"


def check_layout(layout: Layout, shape: tuple[int, ...] | list[int]) -> None:
    """Raise InvalidArgument when `layout` cannot describe a per-example `shape`."""
    if layout not in LAYOUTS:
        raise InvalidArgument(f"unknown layout {layout!r}; allowed: {', '.join(LAYOUTS)}")
    if layout == "NHWC" and len(shape) != 3:
        raise InvalidArgument(f"layout NHWC needs a per-example shape (H, W, C); got {list(shape)}")
    if layout == "NCHW" and len(shape) not in (2, 3):
        raise InvalidArgument(
            f"layout NCHW needs a per-example shape (C, H, W) or (H, W); got {list(shape)}"
        )


def channel_axis(layout: Layout, ndim: int) -> int | None:
    """The channel axis of one example of rank `ndim`, or None (features, (H, W) images)."""
    if layout == "NHWC":
        return ndim - 1
    if layout == "NCHW" and ndim == 3:
        return 0
    return None


def spatial_axes(layout: Layout, ndim: int) -> tuple[int, int]:
    """The (height, width) axes of one image example; InvalidArgument for features."""
    if layout == "features":
        raise InvalidArgument(
            "this needs an image input (layout NCHW or NHWC); the model's layout is features"
        )
    if layout == "NHWC":
        return ndim - 3, ndim - 2
    return ndim - 2, ndim - 1


def image_hw(layout: Layout, shape: tuple[int, ...]) -> tuple[int, int]:
    """Height and width of one image example of `shape`."""
    h_axis, w_axis = spatial_axes(layout, len(shape))
    return int(shape[h_axis]), int(shape[w_axis])
