"""Multimodal runs: a vision- or audio-language model over the shared run setup.

`config.media` (`MediaModelConfig`) turns an SFT run multimodal: the model is a
`VisionLanguageModel` (LLaVA: ViT tower -> MLP projector -> decoder) or an
`AudioLanguageModel` (Qwen2-Audio: Whisper-style tower -> projector -> decoder), built from
scratch from config.model (the text decoder) plus the tower's fields, or imported from an HF
LLaVA / Qwen2-Audio directory (`config.init_from`, or a previous multimodal run's workdir,
whose export/hf holds one). The loss is the text objective's through `models.media.with_media`,
the data `data/media_batches.py` (records `{"messages", "images" | "audios"}`, data/multimodal.py).

Stages are what `media.train` names: ("projector",) trains the projector over a frozen tower
and decoder (LLaVA's stage 1); adding "encoder" unfreezes the tower; "language_model" trains
the decoder too, fully or, with config.lora, through LoRA adapters (stage 2). A stage starts
from the previous one's workdir with `config.init_from=<workdir>`.

With the encoder frozen, `media.cache_features=True` runs the tower once over every record
before training and feeds the stored features to the projector instead of the pixels /
log-mels (train/cached_features.py; SFT only).

The export (`workdir/export/hf`) is the HF layout (`LlavaForConditionalGeneration` /
`Qwen2AudioForConditionalGeneration`) with the tokenizer files and a
`preprocessor_config.json` (the image processor's or the Whisper feature extractor's fields),
so `python -m wakea_jax.sample --checkpoint=<workdir>/export/hf --image=...` and
transformers load it.

The placeholder token (`<image>` / `<audio>` in message text) gets a dedicated id
(`media.placeholder_id`, default: the tokenizer's vocab_size, the first id no text encodes
to), so config.model.vocab_size must exceed it; the sampler never produces it (vocab_limit).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
from absl import logging
from flax import nnx

from wakea_jax.checkpoints import llava as llava_ckpt
from wakea_jax.checkpoints import qwen2_audio as qwen2_audio_ckpt
from wakea_jax.data import media_batches
from wakea_jax.data import multimodal as mm_data
from wakea_jax.data import tokenizer as tokenizer_lib
from wakea_jax.data.audio import FeatureConfig
from wakea_jax.data.images import ImageConfig
from wakea_jax.models import lora as lora_lib
from wakea_jax.models.audio import AudioEncoderConfig
from wakea_jax.models.media import with_media
from wakea_jax.models.multimodal import (
    AudioLanguageConfig,
    AudioLanguageModel,
    VisionLanguageConfig,
    VisionLanguageModel,
)
from wakea_jax.models.projector import ProjectorConfig
from wakea_jax.models.vision import VisionConfig
from wakea_jax.objectives.sft import sft_loss_fn
from wakea_jax.parallel import mesh as mesh_lib
from wakea_jax.sampling.sampler import check_vocab
from wakea_jax.train import cached_features, hf_export, supervised
from wakea_jax.train import setup as setup_lib

KINDS = ("vision", "audio")
PARTS = ("encoder", "projector", "language_model")
_TOWER = {"vision": "vision_tower", "audio": "audio_tower"}


@dataclasses.dataclass(frozen=True)
class MediaModelConfig:
  """config.media: the encoder, projector, preprocessing and what trains.

  kind            "vision" or "audio" ("" : a text run).
  vision          VisionConfig fields (kind "vision", from scratch).
  projector       ProjectorConfig fields besides in_dim/out_dim (hidden_act, pool_window).
  vision_feature_layer / vision_feature_select_strategy   as LLaVA's config.
  image           ImageConfig fields; height/width default to the tower's image_size.
  audio           AudioEncoderConfig fields (kind "audio", from scratch).
  features        FeatureConfig fields (the log-mel front end).
  placeholder_id  the <image>/<audio> token id; -1: the tokenizer's vocab_size.
  train           the parts that train: a subset of PARTS.
  max_media       media slots per row (images or clips).
  worker_count    grain workers decoding media.
  cache_features  run the frozen encoder once per record and train on its stored output
                  (train/cached_features.py); needs "encoder" out of `train`; SFT only.
  """

  kind: str = ""
  vision: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  projector: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  vision_feature_layer: int = -1
  vision_feature_select_strategy: str = "full"
  image: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  audio: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  features: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  placeholder_id: int = -1
  train: tuple[str, ...] = PARTS
  max_media: int = 1
  worker_count: int = 0
  cache_features: bool = False

  def __post_init__(self) -> None:
    if self.kind not in ("",) + KINDS:
      raise ValueError(f"media.kind must be one of {KINDS} (or '' for text), got {self.kind!r}")
    train = (self.train,) if isinstance(self.train, str) else tuple(self.train)
    object.__setattr__(self, "train", train)
    unknown = sorted(set(train) - set(PARTS))
    if unknown or not train:
      raise ValueError(f"media.train must name some of {PARTS}, got {self.train!r}")
    if self.max_media < 1:
      raise ValueError(f"media.max_media must be >= 1, got {self.max_media}")
    if self.cache_features and "encoder" in train:
      raise ValueError(f"config.media.cache_features=True stores the frozen encoder's features, "
                       f"but config.media.train={train} trains the 'encoder'; remove it from "
                       "config.media.train or set config.media.cache_features=False")

  @property
  def enabled(self) -> bool:
    """Whether the run is multimodal."""
    return bool(self.kind)


def placeholder_id(config: MediaModelConfig, tokenizer: tokenizer_lib.Tokenizer) -> int:
  """The placeholder token id (media.placeholder_id, or the tokenizer's vocab_size)."""
  return config.placeholder_id if config.placeholder_id >= 0 else tokenizer.vocab_size


def model_config(run: setup_lib.RunConfig, config: MediaModelConfig,
                 tokenizer: tokenizer_lib.Tokenizer) -> VisionLanguageConfig | AudioLanguageConfig:
  """The multimodal model config of a from-scratch run."""
  text, token = run.model, placeholder_id(config, tokenizer)
  if token >= text.vocab_size:
    raise ValueError(f"the {config.kind} placeholder id {token} needs config.model.vocab_size > "
                     f"{token} (now {text.vocab_size}); pad the vocabulary (e.g. to "
                     f"{-(-(token + 1) // 128) * 128}) or set media.placeholder_id")
  try:
    if config.kind == "vision":
      vision = VisionConfig(**dict(config.vision))
      layers = 1 if isinstance(config.vision_feature_layer, int) else len(
          config.vision_feature_layer)
      projector = ProjectorConfig(in_dim=vision.embed_dim * layers, out_dim=text.embed_dim,
                                  **dict(config.projector))
      return VisionLanguageConfig(
          text=text, vision=vision, projector=projector, image_token_id=token,
          vision_feature_layer=config.vision_feature_layer,
          vision_feature_select_strategy=config.vision_feature_select_strategy)
    if not text.qkv_bias or text.qk_norm:
      # Checked before training: the export (Qwen2AudioForConditionalGeneration) would fail.
      raise ValueError("Qwen2-Audio's decoder is Qwen2: set config.model.qkv_bias=True and "
                       "config.model.qk_norm=False")
    return AudioLanguageConfig(text=text, audio=AudioEncoderConfig(**dict(config.audio)),
                               audio_token_id=token)
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.media: {e}") from None


def _hf_dir(init_from: str) -> pathlib.Path | None:
  """An HF LLaVA / Qwen2-Audio directory: a run workdir's export/hf, or init_from itself (a
  workdir's own config.json is the run's config, so export/hf is looked at first)."""
  for directory in (pathlib.Path(init_from) / "export" / "hf", pathlib.Path(init_from)):
    if (directory / "config.json").is_file():
      return directory
  return None


def load_pretrained(init_from: str, kind: str, dtype: str
                    ) -> VisionLanguageModel | AudioLanguageModel:
  """The multimodal model of an HF directory or a multimodal run's workdir."""
  directory = _hf_dir(init_from)
  if directory is None:
    raise FileNotFoundError(f"config.init_from {init_from}: no config.json there nor in its "
                            "export/hf (a multimodal run starts from an HF LLaVA / Qwen2-Audio "
                            "directory or a previous multimodal run's workdir)")
  model_type = json.loads((directory / "config.json").read_text()).get("model_type")
  expected = "llava" if kind == "vision" else "qwen2_audio"
  if model_type != expected:
    raise ValueError(f"config.init_from {directory}/config.json: model_type {model_type!r}, but "
                     f"media.kind={kind!r} needs {expected!r}")
  load = llava_ckpt.load_llava if kind == "vision" else qwen2_audio_ckpt.load_qwen2_audio
  return load(directory, dtype=dtype)


def trainable_filter(config: MediaModelConfig, lora: lora_lib.LoRAConfig | None) -> Any:
  """The parameters media.train names (the decoder's LoRA adapters alone under LoRA)."""
  paths = {"encoder": _TOWER[config.kind], "projector": "projector",
           "language_model": "language_model"}
  parts = []
  for part in config.train:
    kind = nnx.LoRAParam if part == "language_model" and lora is not None else nnx.Param
    parts.append(nnx.All(kind, nnx.PathContains(paths[part])))
  return nnx.Any(*parts)


def builder(config: MediaModelConfig) -> setup_lib.ModelBuilder:
  """The `build` of `setup_lib.setup` for a multimodal run."""

  def build(run: setup_lib.RunConfig, mesh: jax.sharding.Mesh, rules: mesh_lib.Rules,
            tokenizer: tokenizer_lib.Tokenizer) -> tuple[nnx.Module, Any]:
    if config.cache_features and run.objective != "sft":
      raise ValueError(f"config.media.cache_features is supported for SFT only "
                       f"(config.objective={run.objective!r}); set it to False")
    if run.lora is not None and "language_model" not in config.train:
      raise ValueError("config.lora adapts the language model: add 'language_model' to "
                       "media.train, or disable LoRA")
    if run.init_from:
      model = load_pretrained(run.init_from, config.kind, run.model.dtype)
      logging.info("initialised from %s", run.init_from)
    else:
      mm = model_config(run, config, tokenizer)
      cls = VisionLanguageModel if config.kind == "vision" else AudioLanguageModel
      graphdef, _ = nnx.split(nnx.eval_shape(lambda: cls(mm, rngs=nnx.Rngs(run.seed))))
      state = jax.jit(lambda: nnx.split(cls(mm, rngs=nnx.Rngs(run.seed)))[1])()
      model = nnx.merge(graphdef, state)
    check_vocab(tokenizer, model.config.text, model_source="the multimodal model")
    if run.lora is not None:
      model.language_model = lora_lib.apply_lora(model.language_model, run.lora,
                                                 rngs=nnx.Rngs(run.seed))
    nnx.update(model, mesh_lib.shard_state(nnx.state(model), mesh, rules))
    return model, trainable_filter(config, run.lora)

  return build


def media_config(model: VisionLanguageModel | AudioLanguageModel, config: MediaModelConfig
                 ) -> mm_data.MediaConfig:
  """How the run's records are read for `model` (data/multimodal.py)."""
  if isinstance(model.config, VisionLanguageConfig):
    size = model.config.vision.image_size
    image = ImageConfig(**{"height": size, "width": size, **dict(config.image)})
    return mm_data.MediaConfig.for_vision(model.config, image)
  return mm_data.MediaConfig.for_audio(model.config, FeatureConfig(**dict(config.features)))


def preprocessor_dict(media: mm_data.MediaConfig) -> dict[str, Any]:
  """The HF `preprocessor_config.json` of the run's preprocessing (what ImageConfig.from_dict
  and FeatureConfig.from_json read back)."""
  if media.image is not None:
    i = media.image
    size = ({"shortest_edge": i.shortest_edge} if i.shortest_edge
            else {"height": i.height, "width": i.width})
    return {"image_processor_type": "SiglipImageProcessor", "do_resize": i.do_resize,
            "size": size, "resample": i.resample, "do_center_crop": i.crop is not None,
            "crop_size": ({"height": i.crop[0], "width": i.crop[1]} if i.crop else None),
            "do_rescale": i.do_rescale, "rescale_factor": i.rescale_factor,
            "do_normalize": i.do_normalize, "image_mean": list(i.image_mean),
            "image_std": list(i.image_std), "do_convert_rgb": i.do_convert_rgb}
  assert media.audio is not None
  return {"feature_extractor_type": "WhisperFeatureExtractor",
          **dataclasses.asdict(media.audio)}


def export(built: setup_lib.Setup, state: Any, media: mm_data.MediaConfig,
           directory: pathlib.Path) -> pathlib.Path | None:
  """Writes the trained model as an HF LLaVA / Qwen2-Audio directory to directory/hf (LoRA
  merged), with the tokenizer files and preprocessor_config.json. Process 0 writes."""
  if not built.run.export.enabled:
    return None
  return setup_lib.write_on_process0(
      state, lambda params, frozen: _write_hf(built, params, frozen, media, directory))


def _write_hf(built: setup_lib.Setup, params: Any, frozen: Any, media: mm_data.MediaConfig,
              directory: pathlib.Path) -> pathlib.Path:
  model = nnx.merge(built.graphdef, params, frozen)
  if built.run.lora is not None:
    model.language_model = lora_lib.merge_lora(model.language_model)
  target = directory / "hf"
  save = (llava_ckpt.save_llava if isinstance(model, VisionLanguageModel)
          else qwen2_audio_ckpt.save_qwen2_audio)
  save(model, target, overwrite=True)
  files = hf_export.side_files(built.tokenizer, model.config.text, init_from=built.run.init_from)
  files["preprocessor_config.json"] = (json.dumps(preprocessor_dict(media), indent=2)
                                       + "\n").encode()
  for name, data in files.items():
    (target / name).write_bytes(data)
  logging.info("exported to %s", target)
  return target


def _source(specs: tuple[str, ...], media: mm_data.MediaConfig, on_error: str, field: str
            ) -> mm_data.MultimodalSource | None:
  if not specs:
    return None
  if len(specs) > 1:
    raise ValueError(f"config.data.{field}: a multimodal run reads one media records file or "
                     f"datasets directory, got {len(specs)}: {list(specs)}")
  return mm_data.load_source(specs[0], media, on_error=on_error)


def run_sft(run: setup_lib.RunConfig, config: MediaModelConfig, workdir: str | pathlib.Path
            ) -> dict[str, float]:
  """Multimodal SFT (or projector alignment, per media.train) in `workdir`, resumable like
  any SFT run; returns the last logged metrics."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  built = setup_lib.setup(run, with_media(sft_loss_fn), build=builder(config))
  data = run.data
  supervised.check_global_batch(built, data.batch_size, "data.batch_size")
  model = nnx.merge(built.graphdef, built.state.params, built.state.frozen)
  media = media_config(model, config)
  del model
  train_source = _source(tuple(spec for spec, _ in data.sources), media, data.on_error,
                         "sources")
  if train_source is None:
    raise ValueError("config.data.sources: a multimodal run needs a media records file")
  count, index = jax.process_count(), jax.process_index()
  slots = dict(max_images=config.max_media if media.image is not None else 0,
               max_audios=config.max_media if media.audio is not None else 0)
  batching = media_batches.MediaBatchConfig(
      seq_len=data.seq_len, batch_size=data.batch_size // count, seed=data.seed,
      worker_count=config.worker_count, process_index=index, process_count=count,
      overlength="drop" if data.overlength == "drop" else "error",
      packing=data.packing, **slots)
  eval_source = _source(tuple(spec for spec, _ in data.eval_sources), media, data.on_error,
                        "eval_sources")
  cached: dict[str, Any] = {}
  if config.cache_features:
    splits = {"train": train_source, **({"eval": eval_source} if eval_source else {})}
    cached = cached_features.prepare(built, media, workdir, sources=splits,
                                     max_media=config.max_media, batch_size=data.batch_size,
                                     worker_count=config.worker_count)
  train_iter = media_batches.MediaBatchIterator(train_source, built.tokenizer, media, batching,
                                                cached=cached.get("train"))
  eval_batches: list[dict[str, Any]] = []
  if eval_source is not None:
    supervised.check_global_batch(built, data.eval_batch_size, "data.eval_batch_size")
    eval_batches = media_batches.eval_batches(
        eval_source, built.tokenizer, media,
        dataclasses.replace(batching, batch_size=data.eval_batch_size // count),
        num_batches=data.eval_batch_limit, cached=cached.get("eval"))
  state, last = supervised.train_on_batches(built, workdir, train_iter=train_iter,
                                            eval_batches=eval_batches, seq_len=data.seq_len)
  export(built, state, media, workdir / "export")
  return last


__all__ = ["KINDS", "MediaModelConfig", "PARTS", "builder", "export", "load_pretrained",
           "media_config", "model_config", "placeholder_id", "preprocessor_dict", "run_sft",
           "trainable_filter"]
