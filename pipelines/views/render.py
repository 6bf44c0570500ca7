"""Rendering views from their parameter rows: decode, crop, flip, the photometric ops, then mixing.

The ops run in timm's order on the uint8 view in the worker that renders it: crop and resize (the recipe's
``interpolation``) and flip, then RandAugment or colour jitter on the PIL image (``photometric.py``: PIL's
``ImageOps``/``ImageEnhance``/``transform`` as timm calls them; torchvision's functional ops for colour jitter and
torchvision's RandAugment), then random erasing on the uint8 view, then (on the device) mixing. timm erases the
normalised tensor per sample, before its batch is mixed; here the erased pixels are ``mean + std * N(0, 1)``
in [0, 1] (timm's noise in the recipe's mean/std, ImageNet's), rounded to uint8 and clipped, drawn as grey levels
from the Philox stream of ``re_seed`` (``noise.py``: integers only), before the views mix: the pixels cross processes
as uint8 like every view and are the same in any process on any machine. uint8 becomes float in [0, 1] through
``float_views`` (``pixels.py``), the same bits on every device. The libraries that run the ops are named in the
recipe's ``pixel_ops`` (in its digest).

Two ways to build views, chosen by the data set:

- in-memory data sets (every image the same size): ``apply_views`` turns uint8 images and parameter rows
  into float views in [0, 1] by one crop-and-resize over the batch (``_crop_flip``: grid_sample's arithmetic
  written as separate multiplies and adds), the same bits on every CPU and on GPUs.
- data sets on disk (images of any size): ``render_views`` decodes each image and takes its crop box
  (fractions of *that* image's height and width) with PIL's antialiased bilinear resize straight to the
  recipe's output size, then flips: uint8 ``(B, 3, S, S)``, which is what crosses process boundaries.
  With ``recipe.draft`` a JPEG is decoded at 1/2, 1/4 or 1/8 size by DCT scaling (PIL's ``draft``) when
  the crop still spans at least ``S`` pixels at that scale: the largest such scale, a function of the
  stored box, the image's size and ``S`` alone, so the teacher and the student decode the same pixels in
  any process and any batch. ``mix_views`` then mixes the uint8 views (as floats) on the device.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F

from stillroom.pipelines.core import DataError, UsageError
from stillroom.pipelines.views.draw import draw_views, partner_ids
from stillroom.pipelines.views.photometric import ViewPhotometric
from stillroom.pipelines.views.pixels import float_views
from stillroom.pipelines.views.recipes import (
    COL,
    MIX_CUTMIX,
    MIX_MIXUP,
    MIX_NONE,
    Recipe,
    _check_width,
    get_recipe,
    no_view_size,
    output_size,
    own_rows,
    partner_rows,
    photometric_of,
)

DRAFT_SCALES = (8, 4, 2, 1)


def _crop_flip(images: torch.Tensor, boxes: torch.Tensor, out_hw: tuple[int, int], mode: str = "bilinear"
               ) -> torch.Tensor:
    """Crop ``(y0, x0, h, w)`` fractions and flip (5th column), resized to ``out_hw``, bilinear (or bicubic).

    What ``F.affine_grid`` + ``F.grid_sample(padding_mode="border", align_corners=False)`` compute, written out
    as two separable passes (rows, then columns) of gathers and weighted sums, one elementwise op at a time.
    Our own because grid_sample's AVX2 kernel rounds otherwise than its scalar one and CUDA's (ulps in every
    view): here every op is one IEEE-rounded multiply or add, whose result no instruction set changes, and the
    taps and weights are computed on the CPU in float64 (CUDA divides by a reciprocal) and moved to the device.
    """
    boxes64 = boxes.detach().to("cpu", torch.float64)
    y0, x0, h, w, flip = boxes64.unbind(1)
    rows = _taps(y0, h, torch.ones_like(flip), int(images.shape[2]), out_hw[0], mode)
    cols = _taps(x0, w, 1 - 2 * flip, int(images.shape[3]), out_hw[1], mode)
    out = _resample(images, rows, 2)
    out = _resample(out, cols, 3)
    return out if mode == "bilinear" else out.clamp_(0, 1)


# timm's and torch's bicubic: the cubic convolution kernel with a = -0.75
_CUBIC_A = -0.75


def _taps(start: torch.Tensor, size: torch.Tensor, sign: torch.Tensor, n_in: int, n_out: int, mode: str
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Source indices ``(B, n_out, T)`` and weights of one axis: output pixel j samples the crop's point
    ``sign * ((2j + 1) / n_out - 1)`` (normalised), i.e. ``ix = ((s + 1) * n_in - 1) / 2`` in source pixels;
    bilinear clips ``ix`` to the border, bicubic clips each of its 4 taps (grid_sample's ``border``)."""
    grid = (2 * torch.arange(n_out, dtype=torch.float64) + 1) / n_out - 1
    s = (size * sign)[:, None] * grid[None] + (2 * start + size - 1)[:, None]
    ix = ((s + 1) * n_in - 1) / 2
    if mode == "bilinear":
        ix = ix.clamp(0, n_in - 1)
        left = ix.floor()
        t = ix - left
        index = torch.stack([left, left + 1], -1)
        weight = torch.stack([1 - t, t], -1)
    else:
        left = ix.floor()
        t = ix - left
        a = _CUBIC_A
        d = torch.stack([t + 1, t, 1 - t, 2 - t], -1)  # each tap's distance
        near = ((a + 2) * d - (a + 3)) * d * d + 1
        far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
        weight = torch.where(d <= 1, near, far)
        index = torch.stack([left - 1, left, left + 1, left + 2], -1)
    return index.clamp(0, n_in - 1).long(), weight.float()


def _resample(x: torch.Tensor, taps: tuple[torch.Tensor, torch.Tensor], dim: int) -> torch.Tensor:
    """Resample ``x`` along ``dim`` (2: rows, 3: columns) with ``_taps``' indices and weights: the weighted sum of
    the gathered taps, one multiply and one add at a time, in a fixed order."""
    index, weight = (t.to(x.device) for t in taps)
    b, c = x.shape[:2]
    out = None
    for k in range(index.shape[-1]):
        idx, wk = index[..., k], weight[..., k]
        if dim == 2:
            shape = (b, 1, idx.shape[1], 1)
            gathered = x.gather(2, idx.view(shape).expand(b, c, idx.shape[1], x.shape[3]))
        else:
            shape = (b, 1, 1, idx.shape[1])
            gathered = x.gather(3, idx.view(shape).expand(b, c, x.shape[2], idx.shape[1]))
        term = gathered * wk.view(shape)
        out = term if out is None else out + term
    assert out is not None
    return out


def _cut_mask(boxes: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """(B, 1, H, W) mask, 1 where a pixel centre lies inside the cutmix box."""
    oh, ow = out_hw
    ys = (torch.arange(oh, device=boxes.device, dtype=boxes.dtype) + 0.5) / oh
    xs = (torch.arange(ow, device=boxes.device, dtype=boxes.dtype) + 0.5) / ow
    y0, x0, h, w = (c[:, None] for c in boxes.unbind(1))
    in_y = (ys[None] >= y0) & (ys[None] < y0 + h)
    in_x = (xs[None] >= x0) & (xs[None] < x0 + w)
    return (in_y[:, :, None] & in_x[:, None, :]).unsqueeze(1).to(boxes.dtype)


def apply_views(images: torch.Tensor, params: torch.Tensor | np.ndarray, out_size: int | None = None,
                partner_images: torch.Tensor | None = None, recipe: Recipe | None = None) -> torch.Tensor:
    """Build the views: uint8 ``(B, C, H, W)`` images and ``(B, P)`` params -> float32 views in [0, 1].

    ``partner_images`` are the images of each row's partner (any image where the row does not mix);
    they are needed only when some row mixes. Mixup blends the two views by lambda; cutmix pastes the
    partner's view inside the cutmix box. A ``recipe`` with photometric ops (its rows have their columns):
    the cropped views are rounded to uint8 and the ops applied to each on the CPU (``_photometric_views``)
    before they mix; ``recipe.interpolation`` bicubic samples the crop bicubically.
    """
    params = torch.as_tensor(params, dtype=torch.float32, device=images.device)
    _check_width(params, recipe)
    if len(params) != len(images):
        raise UsageError(f"view params of shape {tuple(params.shape)} for {len(images)} images")
    out_hw = (out_size, out_size) if out_size else (int(images.shape[2]), int(images.shape[3]))
    # erasing boxes are in pixels of the recipe's output size, or (none) of the images' own: at another size (a
    # teacher's input) they are scaled to it, so the view erases the same fraction
    drawn = (recipe.out_size,) * 2 if recipe is not None and recipe.out_size else tuple(images.shape[2:4])
    scale = (out_hw[0] / float(drawn[0]), out_hw[1] / float(drawn[1]))
    mode = recipe.interpolation if recipe is not None else "bilinear"
    photo = photometric_of(recipe, out_hw[0]) if recipe is not None else None
    x = _crop_flip(float_views(images), params[:, 0:5], out_hw, mode)
    if photo is not None:
        x = _photometric_views(x, own_rows(params.cpu().numpy(), recipe)[:, 5:], photo, scale)
    if _mixes(params):
        if partner_images is None:
            raise UsageError("these views mix two images: pass partner_images")
        p = _crop_flip(float_views(partner_images), params[:, 8:13], out_hw, mode)
        if photo is not None:
            p = _photometric_views(p, partner_rows(params.cpu().numpy(), recipe)[:, 5:], photo, scale)
        x = _mix(x, p, params, out_hw)
    return x


def _photometric_views(x: torch.Tensor, rows: np.ndarray, photo: ViewPhotometric, scale: tuple[float, float]
                       ) -> torch.Tensor:
    """Float views in [0, 1] -> the same views rounded to uint8, each through the photometric ops (PIL, on the
    CPU) from its row, back as floats in [0, 1] on ``x``'s device; ``scale``: the views' (height, width) over the
    size their erasing boxes were drawn at."""
    from PIL import Image

    u8 = (x * 255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = np.empty_like(u8)
    for i, view in enumerate(u8):
        img = Image.fromarray(view[:, :, 0] if view.shape[2] == 1 else view)
        out[i] = photo.apply(img, rows[i], scale)
    return float_views(torch.from_numpy(out).permute(0, 3, 1, 2).to(x.device))


def _mixes(params: torch.Tensor) -> bool:
    return bool((params[:, COL["mix_mode"]] != MIX_NONE).any())


def _mix(x: torch.Tensor, p: torch.Tensor, params: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """Mixup blends view and partner view by lambda; cutmix pastes the partner's view inside the box."""
    mode = params[:, COL["mix_mode"]]
    lam = params[:, COL["lam"]][:, None, None, None]
    mixup = (mode == MIX_MIXUP)[:, None, None, None]
    cut = (mode == MIX_CUTMIX)[:, None, None, None] * _cut_mask(params[:, 13:17], out_hw)
    x = torch.where(mixup, lam * x + (1 - lam) * p, x)
    return x * (1 - cut) + p * cut


def mix_views(own: torch.Tensor, partner: torch.Tensor | None, params: torch.Tensor | np.ndarray,
              partner_index: np.ndarray | torch.Tensor | None = None) -> torch.Tensor:
    """uint8 views from ``render_views`` (and their partners' views, where some row mixes) -> float views in
    [0, 1], mixed; runs on whatever device ``own`` is on. With ``partner_index`` (``render_batch_pool``),
    ``partner`` holds only the partner views the batch lacks and each row's is gathered here."""
    params = torch.as_tensor(params, dtype=torch.float32, device=own.device)
    x = float_views(own)
    if _mixes(params):
        if partner is None:
            raise UsageError("these views mix two images: pass the partners' views")
        p = float_views(partner.to(own.device))
        if partner_index is not None:
            p = _partner_views(x, p, partner_index)
        x = _mix(x, p, params, (int(own.shape[2]), int(own.shape[3])))
    return x


def draft_scale(box_hw: tuple[float, float], image_hw: tuple[int, int], out_size: int) -> int:
    """The largest DCT scale (8, 4, 2 or 1) at which a crop of ``box_hw`` (fractions) of an ``image_hw`` image
    still spans ``out_size`` pixels each way: decoding smaller then never upsamples what a full decode would
    have shrunk."""
    h = box_hw[0] * image_hw[0]
    w = box_hw[1] * image_hw[1]
    for s in DRAFT_SCALES:
        if h >= out_size * s and w >= out_size * s:
            return s
    return 1


def decode_view(data: bytes, where: str, box: np.ndarray, out_size: int, draft: bool, recipe: Recipe | None = None
                ) -> np.ndarray:
    """One view from encoded bytes: ``box`` = (y0, x0, h, w, flip) -> uint8 ``(out_size, out_size, 3)``.

    Decoded to RGB (CMYK, grayscale, palette and PNG-named-JPEG files included), at a DCT scale when
    ``draft`` and the crop allows it (``draft_scale``); the crop box is resized with PIL's antialiased
    bilinear filter (``recipe.interpolation``: bicubic where the recipe says so) straight from the decoded image.
    With a ``recipe`` that has photometric ops, ``box`` goes on with the view's photometric columns (``own_rows``),
    applied after the flip. Raises ``DataError`` naming ``where``."""
    return decode_views(data, where, [(box, out_size)], draft, recipe)[0]


def decode_views(data: bytes, where: str, requests: list[tuple[np.ndarray, int]], draft: bool,
                 recipe: Recipe | None = None) -> list[np.ndarray]:
    """Several views of one encoded image, each ``(box, size)`` a uint8 ``(size, size, 3)`` view bit-identical to
    ``decode_view`` of that box at that size alone: the views a batch needs of one sample (FKD's multi-crop,
    ``--views-per-image``; its views under several seeds) at each size they are needed at (a teacher of another
    input size). The image is decoded once for each distinct DCT scale the requests take (once in all without
    ``draft``, or when every request allows the same scale), then each request cropped and resized from it."""
    from PIL import Image

    out: list[np.ndarray] = [np.empty(0)] * len(requests)
    try:
        encoded = Image.open(io.BytesIO(data))
        jpeg = draft and encoded.format in ("JPEG", "MPO")
        full = (encoded.height, encoded.width)
        scales = [draft_scale((float(box[2]), float(box[3])), full, size) if jpeg else 1 for box, size in requests]
        for n, s in enumerate(sorted(set(scales), reverse=True)):
            if n:  # a decoded image cannot be decoded again at another scale: open it anew
                encoded = Image.open(io.BytesIO(data))
            if s > 1:
                encoded.draft("RGB", (encoded.width // s, encoded.height // s))
            img = encoded.convert("RGB") if encoded.mode != "RGB" else encoded
            img.load()
            for i in (i for i, scale in enumerate(scales) if scale == s):
                out[i] = _crop_resize(img, *requests[i], recipe)
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{where}: cannot decode ({str(e).splitlines()[0][:120]})") from None
    return out


def _crop_resize(img, box: np.ndarray, out_size: int, recipe: Recipe | None = None) -> np.ndarray:
    from PIL import Image

    y0, x0, h, w, flip = (float(v) for v in box[:5])
    H, W = img.height, img.width
    region = (x0 * W, y0 * H, (x0 + w) * W, (y0 + h) * H)
    bicubic = recipe is not None and recipe.interpolation == "bicubic"
    view = img.resize((out_size, out_size), Image.Resampling.BICUBIC if bicubic else Image.Resampling.BILINEAR,
                      box=region)
    if flip:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    photo = photometric_of(recipe, out_size) if recipe is not None else None
    if photo is None:
        return np.asarray(view)
    return photo.apply(view, np.asarray(box[5:]), out_size / float(recipe.out_size or out_size))  # type: ignore[union-attr]


def render_views(dataset, ids: np.ndarray, boxes: np.ndarray, out_size: int, draft: bool, recipe: Recipe | None = None
                 ) -> torch.Tensor:
    """uint8 ``(B, 3, S, S)`` views of a data set on disk (channels-last in memory): sample ``ids[i]`` cropped by
    ``boxes[i]`` (y0, x0, h, w, flip). Reads only these samples' bytes, and each image once: the views of a
    sample that appears several times (``--views-per-image``, several seeds) are cropped from one decode per DCT
    scale (``render_views_at``, ``decode_views``). With a ``recipe`` that has photometric ops, each row of ``boxes``
    goes on with the view's photometric columns (``own_rows``). A pure function of its arguments: runs the same in
    any process."""
    return render_views_at(dataset, ids, boxes, (out_size,), draft, recipe)[out_size]


def render_views_at(dataset, ids: np.ndarray, boxes: np.ndarray, sizes: tuple[int, ...], draft: bool,
                    recipe: Recipe | None = None, failed: dict[int, str] | None = None) -> dict[int, torch.Tensor]:
    """``render_views`` at each of ``sizes`` from the same boxes (a teacher of another input size sees the same
    crop at its own size): each image read once and decoded once per DCT scale, also where its id is on several
    rows (its K views under ``--views-per-image``, its views under several seeds); each size's views are those
    ``render_views`` gives at that size, each bit-identical to its view rendered alone.

    An image that fails to decode raises its ``DataError``; with ``failed`` (a dict, the data set's ``,bad=skip``)
    its rows are left black and ``failed`` gets ``row -> the error's line`` for each of them instead."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    batches = {size: _uint8_batch((len(ids), size, size, 3)) for size in sizes}
    arrays = {size: b.numpy() for size, b in batches.items()}
    unique, inverse = np.unique(ids, return_inverse=True)  # an id on several rows: read once
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(len(unique) + 1))
    for u, (data, where) in enumerate(dataset.encoded(unique)):
        rows = order[bounds[u] : bounds[u + 1]]
        try:
            views = iter(decode_views(data, where, [(boxes[r], size) for r in rows for size in sizes], draft, recipe))
        except DataError as e:
            if failed is None:
                raise
            failed.update((int(r), str(e)) for r in rows)
            for size in sizes:
                arrays[size][rows] = 0
            continue
        for r in rows:
            for size in sizes:
                arrays[size][r] = next(views)
    return {size: b.permute(0, 3, 1, 2) for size, b in batches.items()}  # (B, 3, S, S), channels-last: no copy


def _uint8_batch(shape: tuple[int, ...]) -> torch.Tensor:
    """An empty uint8 tensor; in a DataLoader worker, in shared memory (as torch's own collate allocates it), so
    handing the batch to the main process copies nothing."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(int(np.prod(shape)))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


def render_batch(dataset, ids: np.ndarray, params: np.ndarray, out_size: int, draft: bool,
                 recipe: Recipe | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A batch's uint8 views and, where some row mixes, its partners' uint8 views (rows that do not mix get
    a copy of their own view). What a loader worker process hands over; ``mix_views`` finishes the batch. The
    ``recipe`` (needed where its rows have photometric columns) gives the filter and the photometric ops."""
    own, partner = render_batch_at(dataset, ids, params, (out_size,), draft, recipe)
    return own[out_size], partner[out_size] if partner is not None else None


def render_batch_at(dataset, ids: np.ndarray, params: np.ndarray, sizes: tuple[int, ...], draft: bool,
                    recipe: Recipe | None = None, failed: dict[int, str] | None = None
                    ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor] | None]:
    """``render_batch`` at each of ``sizes`` (``render_views_at``): ``({size: own}, {size: partner} or None)``;
    ``failed`` as ``render_batch_pool``'s."""
    own, extra, index = render_batch_pool(dataset, ids, params, sizes, draft, recipe, failed)
    if extra is None or index is None:
        return own, None
    return own, {size: _partner_views(v, extra[size], index) for size, v in own.items()}


def render_batch_pool(dataset, ids: np.ndarray, params: np.ndarray, sizes: tuple[int, ...], draft: bool,
                      recipe: Recipe | None = None, failed: dict[int, str] | None = None
                      ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor] | None, np.ndarray | None]:
    """A batch's uint8 views and only the partner views it does not hold: ``({size: own}, {size: extra},
    partner_index)``, row ``i``'s partner view being row ``partner_index[i]`` of own followed by extra (its own row
    where it does not mix; ``in_batch_partners`` finds the partners already in the batch); ``(own, None, None)``
    where no row mixes. What a loader worker hands over (``mix_views(..., partner_index=)`` gathers on the device),
    so a batch of partners it holds is neither rendered nor copied twice. With ``failed`` (``render_views_at``) a
    row fails when its own image or its mixing partner's fails to decode: ``failed`` gets ``row -> why``."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    _check_width(params, recipe)
    mixing = params[:, COL["mix_mode"]] != MIX_NONE
    if not mixing.any():
        return render_views_at(dataset, ids, own_rows(params, recipe), sizes, draft, recipe, failed), None, None
    n = len(ids)
    index = np.arange(n, dtype=np.int64)
    rows = np.flatnonzero(mixing)
    source = in_batch_partners(ids, params, rows, recipe)
    here = source >= 0
    index[rows[here]] = source[here]
    rest = rows[~here]
    index[rest] = n + np.arange(len(rest))
    # the batch's own views and the partner views it lacks in one pass: an image that is a sample and (under
    # another view) a partner is read and decoded once (``render_views_at``)
    every: dict[int, str] | None = {} if failed is not None else None
    views = render_views_at(dataset, np.concatenate([ids, params[rest, COL["partner"]].astype(np.int64)]),
                            np.concatenate([own_rows(params, recipe), partner_rows(params[rest], recipe)]),
                            sizes, draft, recipe, every)
    own = {size: v[:n] for size, v in views.items()}
    extra = {size: v[n:] for size, v in views.items()}
    if failed is not None and every is not None:  # a view mixed with a partner that failed fails with it
        failed.update((r, why) for r, why in every.items() if r < n)
        own_failed = dict(failed)
        partner_failed = {int(rest[j - n]): why for j, why in every.items() if j >= n}
        partner_failed.update((int(r), own_failed[int(index[r])]) for r in rows[here] if int(index[r]) in own_failed)
        failed.update((r, f"its mixing partner {why}") for r, why in partner_failed.items() if r not in own_failed)
    return own, extra, index


def _partner_views(own: torch.Tensor, extra: torch.Tensor, index: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Row ``i``: row ``index[i]`` of ``own`` followed by ``extra`` (``render_batch_pool``), on ``own``'s device."""
    index = torch.as_tensor(index, dtype=torch.int64, device=own.device)
    outside = index >= len(own)
    out = own[index.clamp(max=len(own) - 1)]
    if bool(outside.any()):
        out[outside] = extra.to(own.device)[index[outside] - len(own)]
    return out


def in_batch_partners(ids: np.ndarray, params: np.ndarray, rows: np.ndarray, recipe: Recipe | None) -> np.ndarray:
    """For each mixing row in ``rows``, a row of the batch whose own view *is* its partner's view (the partner's id
    and the same one-view row: box, flip, photometric columns), else -1. Rendering is a pure function of the id and
    that row, so the partner's view is then the batch's own view of that row, bit for bit: a batch cut from a run of
    the partner cycle (``StoreStream``, one seed) renders each of its views once and only the last one's partner
    besides."""
    out = np.full(len(rows), -1, dtype=np.int64)
    if not len(rows):
        return out
    ids = np.asarray(ids, dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    wanted = params[rows, COL["partner"]].astype(np.int64)
    at = np.minimum(np.searchsorted(ids[order], wanted), len(ids) - 1)
    found = ids[order[at]] == wanted
    mine, theirs = own_rows(params, recipe), partner_rows(params[rows], recipe)
    for i in np.flatnonzero(found):  # an id on several rows (K views, several seeds): the first whose row matches
        for r in order[at[i]:]:
            if ids[r] != wanted[i]:
                break
            if np.array_equal(mine[r], theirs[i]):
                out[i] = r
                break
    return out


def build_views(dataset, recipe: Recipe, seed: int, ids: np.ndarray | list[int],
                params: np.ndarray | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """Read, draw (unless ``params`` are given, e.g. from the store) and apply: ``(views, params)``, the views
    float32 in [0, 1]."""
    ids = np.asarray(ids, dtype=np.int64)
    size = output_size(recipe, dataset)
    if not dataset.in_memory:
        if params is None:
            params = draw_views(recipe, seed, ids, len(dataset), dataset.sizes)
        own, partner = render_batch(dataset, ids, params, int(size or 0), recipe.draft, recipe)  # size: not None
        return mix_views(own, partner, params), params
    _, H, W = dataset.image_shape
    if params is None:
        params = draw_views(recipe, seed, ids, len(dataset), (H, W))
    images = dataset.read(ids)
    partners = partner_ids(params, ids)
    partner_images = images if np.array_equal(partners, ids) else dataset.read(partners)
    return apply_views(images, params, recipe.out_size, partner_images, recipe), params


def eval_views(dataset, ids: np.ndarray, size: int | None) -> torch.Tensor:
    """Un-augmented float views in [0, 1] for evaluation at ``size`` px: in-memory images resized whole
    (bilinear); images on disk through ``imagenet-eval`` at that size (shorter side to 256/224 of it, centre
    crop)."""
    ids = np.asarray(ids, dtype=np.int64)
    if dataset.in_memory:
        x = float_views(dataset.read(ids))
        if size is not None and (x.shape[-1] != size or x.shape[-2] != size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return x
    if size is None:
        raise UsageError(f"{no_view_size(dataset)}: evaluation needs an output size")
    return build_views(dataset, get_recipe(f"imagenet-eval:size={size}"), 0, ids)[0]


def whole_views(dataset, ids: np.ndarray, size: int) -> torch.Tensor:
    """Whole images (no crop, no flip) squeezed to ``size x size``, float in [0, 1]: the originals beside views."""
    ids = np.asarray(ids, dtype=np.int64)
    if dataset.in_memory:
        return eval_views(dataset, ids, size)
    boxes = np.tile(np.array([0.0, 0.0, 1.0, 1.0, 0.0]), (len(ids), 1))
    return float_views(render_views(dataset, ids, boxes, size, draft=False))
