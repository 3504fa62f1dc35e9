"""Image preprocessing against transformers' CLIP and SigLIP image processors (the PIL
backend, what `CLIPImageProcessor` / `SiglipImageProcessor` fall back to without
torchvision) on generated images of odd sizes and modes, and the decoding errors."""

import json

import numpy as np
import pytest
from PIL import Image

from wakea_jax.data import images

transformers = pytest.importorskip("transformers")


def _images() -> list[Image.Image]:
  rng = np.random.default_rng(0)
  rgb = Image.fromarray(rng.integers(0, 256, (23, 37, 3), dtype=np.uint8), "RGB")
  rgba = Image.fromarray(rng.integers(0, 256, (41, 29, 4), dtype=np.uint8), "RGBA")
  grey = Image.fromarray(rng.integers(0, 256, (17, 50), dtype=np.uint8), "L")
  grey_alpha = Image.fromarray(rng.integers(0, 256, (30, 30, 2), dtype=np.uint8), "LA")
  palette = rgb.convert("P")
  palette.info["transparency"] = 3  # one palette index is transparent
  tiny = Image.fromarray(rng.integers(0, 256, (5, 9, 3), dtype=np.uint8), "RGB")
  return [rgb, rgba, grey, grey_alpha, palette, tiny]


PROCESSORS = {
    "clip": ("CLIPImageProcessorPil",
             dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})),
    # A crop larger than the resize: HF zero-pads before cropping.
    "clip_padded_crop": ("CLIPImageProcessorPil",
                         dict(size={"shortest_edge": 20}, crop_size={"height": 24, "width": 26})),
    "siglip": ("SiglipImageProcessorPil", dict(size={"height": 32, "width": 24})),
}


@pytest.mark.parametrize("name", sorted(PROCESSORS))
def test_equals_transformers(name, tmp_path):
  cls, kwargs = PROCESSORS[name]
  processor = getattr(transformers, cls)(**kwargs)
  processor.save_pretrained(tmp_path)
  config = images.ImageConfig.from_json(tmp_path)
  pictures = _images()
  theirs = processor(pictures, return_tensors="np")["pixel_values"]
  ours = images.preprocess_batch(pictures, config)
  assert ours.shape == theirs.shape and ours.dtype == np.float32
  np.testing.assert_allclose(ours, theirs, atol=1e-6)
  # The same through files (PNG keeps modes and palette transparency).
  paths = []
  for i, picture in enumerate(pictures):
    paths.append(tmp_path / f"{i}.png")
    picture.save(paths[-1])
  np.testing.assert_allclose(images.preprocess_batch(paths, config), theirs, atol=1e-6)
  # uint8 arrays (RGBA: HF composites arrays onto white with its own rounding).
  arrays = [np.asarray(pictures[0]), np.asarray(pictures[1])]
  np.testing.assert_allclose([images.preprocess(a, config) for a in arrays],
                             processor(arrays, return_tensors="np")["pixel_values"], atol=1e-6)


def test_old_integer_sizes(tmp_path):
  """Older CLIP configs give `size` and `crop_size` as ints (shortest edge; square crop) and
  name only a feature_extractor_type."""
  (tmp_path / "preprocessor_config.json").write_text(json.dumps({
      "feature_extractor_type": "CLIPFeatureExtractor", "size": 24, "crop_size": 20,
      "do_center_crop": True, "resample": 2}))
  config = images.ImageConfig.from_json(tmp_path)
  assert (config.shortest_edge, config.crop, config.resample) == (24, (20, 20), 2)
  assert config.image_mean == images.OPENAI_CLIP_MEAN  # the class default
  processor = transformers.CLIPImageProcessorPil.from_pretrained(tmp_path)
  pictures = _images()
  np.testing.assert_allclose(images.preprocess_batch(pictures, config),
                             processor(pictures, return_tensors="np")["pixel_values"],
                             atol=1e-6)


def test_errors_name_the_file(tmp_path):
  config = images.ImageConfig(height=8, width=8)
  with pytest.raises(FileNotFoundError, match="absent.png"):
    images.preprocess(tmp_path / "absent.png", config)
  (tmp_path / "text.png").write_text("not an image")
  with pytest.raises(ValueError, match=r"text\.png: not a readable image"):
    images.preprocess(tmp_path / "text.png", config)
  _images()[0].save(tmp_path / "whole.png")
  data = (tmp_path / "whole.png").read_bytes()
  (tmp_path / "cut.png").write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match=r"cut\.png: not a readable image"):
    images.load_image(tmp_path / "cut.png")
  (tmp_path / "preprocessor_config.json").write_text(json.dumps(
      {"image_processor_type": "ViTImageProcessor"}))
  with pytest.raises(NotImplementedError, match=r"preprocessor_config\.json.*ViTImageProcessor"):
    images.ImageConfig.from_json(tmp_path)
  (tmp_path / "preprocessor_config.json").write_text(json.dumps(
      {"image_processor_type": "SiglipImageProcessor", "size": {"longest_edge": 9}}))
  with pytest.raises(ValueError, match=r"preprocessor_config\.json: field 'size'"):
    images.ImageConfig.from_json(tmp_path)
  with pytest.raises(ValueError, match="different shapes"):
    images.preprocess_batch(_images()[:2], images.ImageConfig(shortest_edge=8))
