"""Image preprocessing in NumPy (PIL decodes and resizes), equal to transformers' CLIP and
SigLIP image processors (their PIL backend, `CLIPImageProcessorPil` / `SiglipImageProcessorPil`,
which `CLIPImageProcessor` / `SiglipImageProcessor` fall back to without torchvision).

The steps, in HF's order:
  convert to RGB  transparency composited onto white; greyscale and palette images expanded
  resize          CLIP: the shortest edge to `size.shortest_edge` (the long edge
                  int(size * long / short)); SigLIP: to `size.height` x `size.width`;
                  PIL's filter `resample` (3 = bicubic) on the uint8 image
  center crop     CLIP: to `crop_size` (top/left offsets floor((in - out) / 2); a too-small
                  image is zero-padded first, as HF does)
  rescale         x * rescale_factor (1/255), computed in float64, stored float32
  normalise       (x - mean) / std per channel, float32
The result is channels-first float32 [3, H, W], the `pixel_values` the towers take
(`models/vision.py`). `ImageConfig.from_json` reads a `preprocessor_config.json`.

Decoding errors name the file: a missing file is FileNotFoundError, an unreadable or
truncated one ValueError("<path>: not a readable image ...").
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from wakea_jax.checkpoints.hf import read_json_object

PathLike = str | os.PathLike[str]

# transformers.image_utils constants.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)

# image_processor_type -> family; the families' class defaults for fields a file omits.
_PROCESSOR_TYPES = {
    "CLIPImageProcessor": "clip", "CLIPImageProcessorFast": "clip",
    "CLIPImageProcessorPil": "clip", "CLIPFeatureExtractor": "clip",
    "SiglipImageProcessor": "siglip", "SiglipImageProcessorFast": "siglip",
    "SiglipImageProcessorPil": "siglip",
}
_DEFAULTS: dict[str, dict[str, Any]] = {
    "clip": dict(do_resize=True, size={"shortest_edge": 224}, resample=3, do_center_crop=True,
                 crop_size={"height": 224, "width": 224}, do_rescale=True,
                 rescale_factor=1 / 255, do_normalize=True, image_mean=OPENAI_CLIP_MEAN,
                 image_std=OPENAI_CLIP_STD, do_convert_rgb=True),
    "siglip": dict(do_resize=True, size={"height": 224, "width": 224}, resample=3,
                   do_center_crop=False, crop_size=None, do_rescale=True,
                   rescale_factor=1 / 255, do_normalize=True,
                   image_mean=IMAGENET_STANDARD_MEAN, image_std=IMAGENET_STANDARD_STD,
                   do_convert_rgb=True),
}
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


@dataclasses.dataclass(frozen=True)
class ImageConfig:
  """What a CLIP / SigLIP image processor does (see the module docstring).

  Resizing is to `shortest_edge` when set, else to `height` x `width`; `crop` is
  (height, width) or None.
  """

  shortest_edge: int | None = None
  height: int | None = 224
  width: int | None = 224
  resample: int = 3
  crop: tuple[int, int] | None = None
  do_resize: bool = True
  do_rescale: bool = True
  rescale_factor: float = 1 / 255
  do_normalize: bool = True
  image_mean: tuple[float, ...] = IMAGENET_STANDARD_MEAN
  image_std: tuple[float, ...] = IMAGENET_STANDARD_STD
  do_convert_rgb: bool = True

  def __post_init__(self) -> None:
    if self.do_resize and self.shortest_edge is None and (self.height is None
                                                          or self.width is None):
      raise ValueError("ImageConfig needs shortest_edge, or height and width, to resize")
    if self.resample not in _RESAMPLE:
      raise ValueError(f"ImageConfig.resample must be a PIL filter code {_RESAMPLE}, "
                       f"got {self.resample!r}")
    if len(self.image_mean) != 3 or len(self.image_std) != 3 or 0 in self.image_std:
      raise ValueError(f"ImageConfig.image_mean / image_std need 3 values (std non-zero), got "
                       f"{self.image_mean} / {self.image_std}")

  @property
  def output_size(self) -> tuple[int, int] | None:
    """(height, width) of every output, when fixed (a crop, or a fixed-size resize)."""
    if self.crop is not None:
      return self.crop
    if self.do_resize and self.shortest_edge is None:
      return (self.height, self.width)
    return None

  @classmethod
  def from_dict(cls, values: dict[str, Any], *,
                source: str = "preprocessor_config.json") -> ImageConfig:
    """From the fields of an HF CLIP / SigLIP `preprocessor_config.json`; the family's class
    defaults fill omitted fields. Errors name `source` and the field."""
    # Old files (openai/clip-vit-*) name only a feature_extractor_type.
    kind = values.get("image_processor_type") or values.get("feature_extractor_type")
    if kind not in _PROCESSOR_TYPES:
      raise NotImplementedError(f"{source}: image_processor_type {kind!r} is not supported "
                                f"(one of {sorted(_PROCESSOR_TYPES)})")
    v = {**_DEFAULTS[_PROCESSOR_TYPES[kind]],
         **{k: x for k, x in values.items() if x is not None}}
    size, crop = v["size"], v["crop_size"]
    # HF's get_size_dict: an int size means the shortest edge, an int crop a square.
    if isinstance(size, int) and not isinstance(size, bool):
      size = {"shortest_edge": size}
    if isinstance(crop, int) and not isinstance(crop, bool):
      crop = {"height": crop, "width": crop}
    if not isinstance(size, dict) or set(size) not in ({"shortest_edge"}, {"height", "width"}):
      raise ValueError(f"{source}: field 'size' must be {{'shortest_edge': n}} or "
                       f"{{'height': h, 'width': w}}, got {size!r}")
    do_crop = bool(v["do_center_crop"])
    if do_crop and (not isinstance(crop, dict) or set(crop) != {"height", "width"}):
      raise ValueError(f"{source}: field 'crop_size' must be {{'height': h, 'width': w}}, "
                       f"got {crop!r}")
    for name in ("image_mean", "image_std"):
      if isinstance(v[name], (int, float)):
        v[name] = [v[name]] * 3
    try:
      return cls(shortest_edge=size.get("shortest_edge"), height=size.get("height"),
                 width=size.get("width"), resample=int(v["resample"]),
                 crop=(int(crop["height"]), int(crop["width"])) if do_crop else None,
                 do_resize=bool(v["do_resize"]), do_rescale=bool(v["do_rescale"]),
                 rescale_factor=float(v["rescale_factor"]),
                 do_normalize=bool(v["do_normalize"]),
                 image_mean=tuple(float(x) for x in v["image_mean"]),
                 image_std=tuple(float(x) for x in v["image_std"]),
                 do_convert_rgb=bool(v["do_convert_rgb"]))
    except (ValueError, TypeError) as e:
      raise ValueError(f"{source}: {e}") from None

  @classmethod
  def from_json(cls, path: PathLike) -> ImageConfig:
    """Reads a `preprocessor_config.json` file (or the one in a checkpoint directory)."""
    file = pathlib.Path(path)
    if file.is_dir():
      file = file / "preprocessor_config.json"
    if not file.is_file():
      raise FileNotFoundError(f"{file} does not exist")
    return cls.from_dict(read_json_object(file), source=str(file))


def load_image(path: PathLike) -> Image.Image:
  """The decoded image at `path` (fully read, so a truncated file fails here, naming it)."""
  file = pathlib.Path(path)
  if not file.is_file():
    raise FileNotFoundError(f"image file {file} does not exist")
  return _decoded(file, file)


def decode_image(data: bytes, where: str) -> Image.Image:
  """The image encoded in `data` (PNG, JPEG, ... bytes, e.g. sent to the server), fully
  decoded; ValueError naming `where` when it is not a readable image."""
  return _decoded(io.BytesIO(data), where)


def _decoded(source: Any, where: Any) -> Image.Image:
  """`Image.open(source)` fully read; ValueError naming `where` when that fails."""
  try:
    with Image.open(source) as image:
      image.load()
      return image.copy()
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    raise ValueError(f"{where}: not a readable image ({type(e).__name__}: {e})") from e


def to_rgb(image: Image.Image) -> Image.Image:
  """RGB with any transparency composited onto white (HF `convert_to_rgb`)."""
  if "A" in image.getbands() or image.info.get("transparency") is not None:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
  return image.convert("RGB")


def resize_shape(height: int, width: int, config: ImageConfig) -> tuple[int, int]:
  """(height, width) after resizing (HF `get_resize_output_image_size`, not square)."""
  if config.shortest_edge is None:
    return config.height, config.width
  short, long = (width, height) if width <= height else (height, width)
  new_short, new_long = config.shortest_edge, int(config.shortest_edge * long / short)
  return (new_long, new_short) if width <= height else (new_short, new_long)


def center_crop(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """image [c, h, w] -> [c, *size], centred; zero-padded first if smaller (HF `center_crop`)."""
  h, w = image.shape[-2:]
  ch, cw = size
  top, left = (h - ch) // 2, (w - cw) // 2
  if top >= 0 and left >= 0:
    return image[..., top:top + ch, left:left + cw]
  new_h, new_w = max(ch, h), max(cw, w)
  padded = np.zeros(image.shape[:-2] + (new_h, new_w), image.dtype)
  pad_top, pad_left = math.ceil((new_h - h) / 2), math.ceil((new_w - w) / 2)
  padded[..., pad_top:pad_top + h, pad_left:pad_left + w] = image
  top, left = top + pad_top, left + pad_left
  return padded[..., max(0, top):min(new_h, top + ch), max(0, left):min(new_w, left + cw)]


def preprocess(image: Image.Image | np.ndarray | PathLike, config: ImageConfig) -> np.ndarray:
  """One image (PIL, HWC uint8 array, or a path) -> float32 pixel values [3, H, W]."""
  if isinstance(image, (str, os.PathLike)):
    image = load_image(image)
  elif isinstance(image, np.ndarray):
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
      raise ValueError(f"an image array must be uint8 [H, W] or [H, W, C], got {image.dtype} "
                       f"{image.shape}")
    image = Image.fromarray(image)
  image = to_rgb(image) if config.do_convert_rgb else image
  if config.do_resize:
    height, width = resize_shape(image.height, image.width, config)
    image = image.resize((width, height), resample=config.resample)
  pixels = np.asarray(image)
  pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)  # channels first
  if pixels.shape[0] != 3:
    raise ValueError(f"a {image.mode} image has {pixels.shape[0]} channel(s), not 3; keep "
                     "do_convert_rgb on")
  if config.crop is not None:
    pixels = center_crop(pixels, config.crop)
  if config.do_rescale:
    pixels = (pixels.astype(np.float64) * config.rescale_factor).astype(np.float32)
  if config.do_normalize:
    pixels = pixels.astype(np.float32)
    mean = np.asarray(config.image_mean, np.float32)[:, None, None]
    std = np.asarray(config.image_std, np.float32)[:, None, None]
    pixels = (pixels - mean) / std
  return np.ascontiguousarray(pixels, dtype=np.float32)


def preprocess_batch(images: Sequence[Image.Image | np.ndarray | PathLike],
                     config: ImageConfig) -> np.ndarray:
  """Images -> float32 [n, 3, H, W]; they must come out the same size (a crop or a fixed
  resize guarantees it), else ValueError."""
  out = [preprocess(image, config) for image in images]
  shapes = sorted({x.shape for x in out})
  if len(shapes) > 1:
    raise ValueError(f"images preprocess to different shapes {shapes}; configure a crop or "
                     "a fixed height and width")
  return np.stack(out) if out else np.zeros((0, 3) + (config.output_size or (0, 0)), np.float32)


__all__ = ["IMAGENET_STANDARD_MEAN", "IMAGENET_STANDARD_STD", "ImageConfig",
           "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "center_crop", "load_image", "preprocess",
           "preprocess_batch", "resize_shape", "to_rgb"]
