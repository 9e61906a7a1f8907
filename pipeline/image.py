"""Decode, resize and encode one image: pure functions over bytes and arrays.

Decoding trusts nothing: the format must be one we allow, the declared pixel count is checked
against `max_pixels` from the header, before any pixel is decoded (Pillow's own bomb check only
warns below 2x its limit, so the warning is an error here), truncated data is an error, and every
mode ends as 8-bit RGB (alpha matted on white, as img2dataset does).

Resizing reuses img2dataset's resize modes and its interpolation names (`ResizeMode`,
`inter_str_to_cv2`), but not its `Resizer` object, which redirects the process's stdout/stderr
file descriptors while it runs and so cannot be called from several threads. Unlike img2dataset,
kiln never upscales by default: a super-resolution stage must not learn from fake pixels (DESIGN.md).
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageOps

from pipeline.config import DEFAULT_MAX_PIXELS, ImageConfig
from pipeline.records import STAGE_DECODE, STAGE_RESIZE, Reject

# Formats kiln decodes. Everything else (TIFF, PSD, ICO, SVG-as-text, ...) is refused: each extra
# decoder is attack surface and none of them is a web photo format worth keeping.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
ENCODE_EXTENSIONS = {"jpg": ".jpg", "png": ".png", "webp": ".webp"}  # cv2.imencode's spelling


@dataclass
class DecodedImage:
    bgr: np.ndarray  # H x W x 3 uint8 in OpenCV's BGR order; possibly reduced (see draft_target)
    source_format: str  # "jpeg", "png", ...
    original_width: int  # as the file declares it, after EXIF orientation
    original_height: int

    @property
    def rgb(self) -> np.ndarray:
        return self.bgr[:, :, ::-1]


@lru_cache(maxsize=1)
def _cv2():
    import cv2

    # One OpenCV thread per call: kiln parallelises across images, and nested pools oversubscribe.
    cv2.setNumThreads(1)
    return cv2


def _jpeg_is_complete(data: bytes) -> bool:
    """True if the JPEG ends with its EOI marker (libjpeg via OpenCV only warns on a cut file)."""
    return data.rstrip(b"\x00\r\n ")[-2:] == b"\xff\xd9"


def _reduction(width: int, height: int, target: int | None) -> int:
    """Largest JPEG DCT scale-down (8, 4, 2) that keeps the shorter side >= target; 1 if none."""
    if not target:
        return 1
    return next((f for f in (8, 4, 2) if min(width, height) // f >= target), 1)


def _looks_like_text(data: bytes) -> str:
    head = data[:256].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "HTML"
    if head.startswith((b"<?xml", b"<svg")):
        return "XML/SVG"
    if head.startswith((b"{", b"[")):
        return "JSON"
    return ""


def _identify(data: bytes) -> str | None:
    """Name the format of bytes Pillow recognises but kiln does not allow (header only, no pixels)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                return im.format
    except Exception:  # noqa: BLE001 - any failure simply means "not an image we can name"
        return None


def _draft_size(width: int, height: int, target: int | None) -> tuple[int, int] | None:
    """Smallest size whose shorter side still covers `target`, for JPEG DCT-domain downscaling."""
    if not target or min(width, height) <= target:
        return None
    scale = target / min(width, height)
    return (max(target, math.ceil(width * scale)), max(target, math.ceil(height * scale)))


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_image_size: int = 0,
    max_aspect_ratio: float = float("inf"),
    draft_target: int | None = None,
) -> DecodedImage:
    """Decode image bytes to RGB or raise `Reject` (stage "decode") with a specific reason.

    `draft_target`: when the source is a JPEG whose shorter side exceeds it, let libjpeg decode at
    1/2, 1/4 or 1/8 scale (never below the target). The stored image is resized to the target
    afterwards anyway, and this is where most of the decode time goes for large photos. Resize
    such an array with `resize_image(..., source_size=(original_width, original_height))`, which
    keeps the full decode's crop and size (see `_resize_reduced` for the filter and its PSNR).
    """
    if not data:
        raise Reject(STAGE_DECODE, "not_an_image", "zero bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        except Image.DecompressionBombError as err:
            raise Reject(STAGE_DECODE, "decompression_bomb", str(err)) from None
        except Image.DecompressionBombWarning as err:
            raise Reject(STAGE_DECODE, "decompression_bomb", str(err)) from None
        except Image.UnidentifiedImageError:
            text = _looks_like_text(data)
            if text:
                raise Reject(STAGE_DECODE, "not_an_image", f"{text} content, {len(data)} bytes") from None
            fmt = _identify(data)
            if fmt:
                raise Reject(STAGE_DECODE, "unsupported_format", f"{fmt} not in {ALLOWED_FORMATS}") from None
            raise Reject(STAGE_DECODE, "not_an_image", f"unrecognised data, {len(data)} bytes, starts {data[:8]!r}") from None
        except Exception as err:  # noqa: BLE001 - hostile headers raise all sorts of things
            if "truncated" in str(err).lower() or isinstance(err, EOFError):  # cut inside its header
                raise Reject(STAGE_DECODE, "truncated", f"{type(err).__name__}: {err}") from None
            raise Reject(STAGE_DECODE, "decode_error", f"{type(err).__name__}: {err}") from None

        with im:
            width, height = im.size
            fmt = (im.format or "").lower()
            # Bombs are refused on the header's numbers, before a single pixel is decoded.
            if width * height > max_pixels:
                raise Reject(STAGE_DECODE, "decompression_bomb", f"declares {width}x{height} = {width * height} px > {max_pixels}")
            # EXIF orientation swaps the displayed width and height (tags 5-8).
            try:
                orientation = im.getexif().get(0x0112, 1) if fmt in ("jpeg", "webp", "png") else 1
            except Exception:  # noqa: BLE001 - a broken EXIF block is not worth losing the image over
                orientation = 1
            if orientation in (5, 6, 7, 8):
                width, height = height, width
            if min(width, height) < min_image_size:
                raise Reject(STAGE_DECODE, "too_small", f"{width}x{height} < {min_image_size} px")
            if max(width, height) / max(1, min(width, height)) > max_aspect_ratio:
                raise Reject(STAGE_DECODE, "aspect_ratio", f"{width}x{height}, ratio {max(width, height) / min(width, height):.2f} > {max_aspect_ratio}")
            jpeg_fast = fmt == "jpeg" and im.mode in ("RGB", "L") and _jpeg_is_complete(data)
            if not jpeg_fast:
                bgr = _decode_with_pillow(im, fmt, orientation, draft_target)
    if jpeg_fast:
        bgr = _decode_jpeg_with_opencv(data, im.size, draft_target)
        if bgr is None:  # OpenCV refused it: let Pillow's stricter decoder name the problem
            with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as im:
                bgr = _decode_with_pillow(im, fmt, orientation, draft_target)
    return DecodedImage(bgr, fmt, width, height)


def _decode_jpeg_with_opencv(data: bytes, size: tuple[int, int], draft_target: int | None) -> np.ndarray | None:
    """The fast path for complete RGB/greyscale JPEGs (most of the web).

    Pillow holds the GIL while it allocates and copies pixels into numpy (tobytes); OpenCV decodes
    straight into an array with the GIL released, so decode threads really run in parallel.
    OpenCV applies the EXIF orientation itself.
    """
    cv2 = _cv2()
    flags = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}
    img = cv2.imdecode(np.frombuffer(data, np.uint8), flags[_reduction(size[0], size[1], draft_target)])
    return img if img is not None and img.ndim == 3 and img.size else None


def _decode_with_pillow(im: Image.Image, fmt: str, orientation: int, draft_target: int | None) -> np.ndarray:
    """Pillow's strict decoder for everything else: truncation is an error, alpha is matted."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            if fmt == "jpeg":
                draft = _draft_size(im.size[0], im.size[1], draft_target)
                if draft is not None:
                    im.draft("RGB", draft)
            im.load()
            if orientation != 1:
                im = ImageOps.exif_transpose(im)
            rgb = np.asarray(_to_rgb(im))
        except Image.DecompressionBombWarning as err:
            raise Reject(STAGE_DECODE, "decompression_bomb", str(err)) from None
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            msg = str(err)
            if "truncated" in msg.lower() or isinstance(err, EOFError):
                raise Reject(STAGE_DECODE, "truncated", msg) from None
            raise Reject(STAGE_DECODE, "decode_error", f"{type(err).__name__}: {msg}") from None
    return np.ascontiguousarray(rgb[:, :, ::-1])


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
    if has_alpha:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: scale to 8 bits rather than clip.
        arr = np.asarray(im, dtype=np.uint32) >> 8
        return Image.fromarray(arr.astype(np.uint8)).convert("RGB")
    return im.convert("RGB")


@lru_cache(maxsize=1)
def _img2dataset_resize():
    """img2dataset's resize modes and interpolation table, from its `resizer.py` alone.

    `import img2dataset.resizer` would run the package's __init__, which imports its whole
    downloader stack (torch, wandb, fsspec: ~2 s and hundreds of MB per Beam worker) for an enum
    and a dict. Loading the one file costs its own imports only (albumentations, cv2).
    """
    import importlib.util
    import os

    from pipeline.compat import set_quiet_env

    set_quiet_env()
    spec = importlib.util.find_spec("img2dataset")
    path = os.path.join(list(spec.submodule_search_locations)[0], "resizer.py")
    mod_spec = importlib.util.spec_from_file_location("kiln_img2dataset_resizer", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module.ResizeMode, module.inter_str_to_cv2


# Pillow's filters for the second stage of the DCT-reduced path (`_resize_reduced`), by
# img2dataset's names; Pillow widens each filter by the reduction factor, so each is antialiased.
# "area" maps to bicubic: the scaled IDCT has already averaged the source (it keeps only the DCT
# coefficients below the reduced image's Nyquist frequency), and what remains is a shrink by less
# than 2x. A second area average there blurs twice: on the photo-like bench web at 256 px it
# scored 37.4 dB PSNR against full decode + area resize, bicubic 45.3 dB (at 512 px: 38.7 vs
# 45.9), and against a Lanczos resize of the full decode bicubic scores 43.4 dB where full decode
# + area scores 43.9 (tests/pipeline/test_image.py checks the bound on photographs).
_REDUCED_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "linear": Image.Resampling.BILINEAR,
    "bilinear": Image.Resampling.BILINEAR,
    "cubic": Image.Resampling.BICUBIC,
    "bicubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "lanczos4": Image.Resampling.LANCZOS,
}


def dct_reduction(source_size: tuple[int, int], array_size: tuple[int, int]) -> int:
    """The JPEG DCT scale-down (1, 2, 4 or 8) that decodes an image of `source_size` (w, h) to
    `array_size` (w, h): libjpeg's output is ceil(side / f); 0 if no factor fits."""
    (sw, sh), (aw, ah) = source_size, array_size
    return next((f for f in (1, 2, 4, 8) if -(-sw // f) == aw and -(-sh // f) == ah), 0)


def _resize_reduced(arr: np.ndarray, cfg: ImageConfig, source_size: tuple[int, int], f: int) -> np.ndarray | None:
    """center_crop / keep_ratio of a DCT-reduced decode, with the full-size decode's geometry.

    Cropping the reduced array at its own integer offsets would shift the picture by up to half a
    reduced pixel and could change the output size by rounding (keep_ratio). Instead the crop and
    the output size are computed on the source's pixel grid, exactly as for a full decode, and the
    crop box is mapped into the reduced array with fractional coordinates (reduced pixel j covers
    source pixels [f*j, f*(j+1))), which Pillow's resampler honours; the filter is
    `_REDUCED_FILTERS`'. Returns None for the modes that are never drafted (the caller then
    resizes the array as it is).
    """
    sw, sh = source_size
    if cfg.resize_mode == "center_crop":
        side = min(sw, sh)
        x0, y0 = (sw - side) // 2, (sh - side) // 2
        box = (x0, y0, x0 + side, y0 + side)
        target = cfg.image_size if cfg.allow_upscale else min(side, cfg.image_size)
        out_w = out_h = target
    elif cfg.resize_mode == "keep_ratio":
        short = min(sw, sh)
        target = cfg.image_size if cfg.allow_upscale else min(short, cfg.image_size)
        k = target / short
        box, out_w, out_h = (0, 0, sw, sh), max(1, round(sw * k)), max(1, round(sh * k))
    else:
        return None
    down = out_w * out_h < (box[2] - box[0]) * (box[3] - box[1])
    resample = _REDUCED_FILTERS[cfg.downscale_interpolation if down else cfg.upscale_interpolation]
    # Pillow holds 3-channel pixels as RGB(X); the filter is per channel, so BGR passes through.
    out = Image.fromarray(arr).resize((out_w, out_h), resample, box=tuple(v / f for v in box))
    return np.asarray(out)


def resize_image(rgb: np.ndarray, cfg: ImageConfig, source_size: tuple[int, int] | None = None) -> np.ndarray:
    """Resize a 3-channel array (either channel order) per img2dataset's mode semantics; never upscales unless allowed.

    center_crop crops the central square first and resizes that (same picture as img2dataset's
    resize-then-crop, at a fraction of the pixels pushed through the filter).

    `source_size`: the (width, height) of the image the array was decoded from (after EXIF
    orientation). When the array is a DCT-reduced decode of it (`decode_image(draft_target=...)`),
    the output has the full-size decode's crop and size (`_resize_reduced`).
    """
    if source_size is not None and tuple(source_size) != (rgb.shape[1], rgb.shape[0]):
        f = dct_reduction(tuple(source_size), (rgb.shape[1], rgb.shape[0]))
        out = _resize_reduced(rgb, cfg, tuple(source_size), f) if f > 1 else None
        if out is not None:
            return out
    cv2 = _cv2()
    ResizeMode, inter_str_to_cv2 = _img2dataset_resize()
    mode = ResizeMode[cfg.resize_mode]
    h, w = rgb.shape[:2]

    def scaled(img, new_w, new_h):
        if (new_w, new_h) == (img.shape[1], img.shape[0]):
            return img
        down = new_w * new_h < img.shape[0] * img.shape[1]
        interp = inter_str_to_cv2(cfg.downscale_interpolation if down else cfg.upscale_interpolation)
        return cv2.resize(img, (new_w, new_h), interpolation=interp)

    if mode == ResizeMode.no:
        return rgb
    if mode == ResizeMode.center_crop:
        side = min(h, w)
        y0, x0 = (h - side) // 2, (w - side) // 2
        square = rgb[y0 : y0 + side, x0 : x0 + side]
        target = cfg.image_size if cfg.allow_upscale else min(side, cfg.image_size)
        return scaled(square, target, target)
    if mode == ResizeMode.keep_ratio:
        short = min(h, w)
        target = cfg.image_size if cfg.allow_upscale else min(short, cfg.image_size)
        k = target / short
        return scaled(rgb, max(1, round(w * k)), max(1, round(h * k)))
    # keep_ratio_largest and border: the longer side goes to image_size.
    long = max(h, w)
    target = cfg.image_size if cfg.allow_upscale else min(long, cfg.image_size)
    k = target / long
    out = scaled(rgb, max(1, round(w * k)), max(1, round(h * k)))
    if mode == ResizeMode.border:
        oh, ow = out.shape[:2]
        top, left = (target - oh) // 2, (target - ow) // 2
        out = cv2.copyMakeBorder(out, top, target - oh - top, left, target - ow - left, cv2.BORDER_CONSTANT, value=(255, 255, 255))
    return out


def encode_image(bgr: np.ndarray, cfg: ImageConfig) -> bytes:
    """Encode a BGR array as cfg.encode_format (JPEG quality 95 by default, as img2dataset)."""
    cv2 = _cv2()
    if cfg.encode_format == "jpg":
        params = [int(cv2.IMWRITE_JPEG_QUALITY), cfg.encode_quality]
    elif cfg.encode_format == "webp":
        params = [int(cv2.IMWRITE_WEBP_QUALITY), cfg.encode_quality]
    else:
        params = [int(cv2.IMWRITE_PNG_COMPRESSION), min(9, max(0, cfg.encode_quality))]
    ok, buf = cv2.imencode(ENCODE_EXTENSIONS[cfg.encode_format], bgr, params)
    if not ok:
        raise Reject(STAGE_RESIZE, "resize_error", f"cv2.imencode failed for {bgr.shape}")
    return buf.tobytes()


def resize_and_encode(bgr: np.ndarray, cfg: ImageConfig, source_size: tuple[int, int] | None = None) -> tuple[bytes, int, int]:
    """The Resize stage's pure function on a BGR array: (encoded bytes, stored width, stored height).
    `source_size`: see `resize_image` (pass the decoded image's original width and height)."""
    try:
        out = resize_image(bgr, cfg, source_size)
        data = encode_image(out, cfg)
    except Reject:
        raise
    except Exception as err:  # noqa: BLE001 - cv2 errors on odd shapes become a reject, not a crash
        raise Reject(STAGE_RESIZE, "resize_error", f"{type(err).__name__}: {err}") from None
    return data, int(out.shape[1]), int(out.shape[0])
