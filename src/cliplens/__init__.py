"""cliplens: everything people do with CLIP-family models, from `import cliplens`.

    >>> import cliplens
    >>> model = cliplens.load_model("offline")
    >>> cliplens.classify(model, ["cat.jpg"], ["cat", "dog"]).predictions[0].labels

Every task is one typed function (or a config and a function) named here; the modules
behind them are the library's own business. Names are imported on first use, so
`import cliplens` (and `cliplens --help`) costs no torch: a name is only looked up in its
module when it is used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it, grouped by what people do
_EXPORTS = {
    # errors: each message names the input and the fix
    "ClipLensError": "cliplens.errors",
    "ImageError": "cliplens.errors",
    "InvalidInputError": "cliplens.errors",
    "ModelUnavailableError": "cliplens.errors",
    "DependencyMissingError": "cliplens.errors",
    # images
    "open_image": "cliplens.images",
    "iter_image_files": "cliplens.images",
    # models
    "load_model": "cliplens.models.registry",
    "ModelRef": "cliplens.models.ref",
    "Encoder": "cliplens.models.encoder",
    "ImageEncoding": "cliplens.models.encoder",
    "ModelInfo": "cliplens.models.info",
    "Precision": "cliplens.device",
    "known_models": "cliplens.models.zoo",
    "describe_model": "cliplens.models.zoo",
    "describe_engines": "cliplens.models.zoo",
    "Engine": "cliplens.models.openvino",
    "save_checkpoint": "cliplens.models.openclip",
    # the photo catalog and search
    "open_catalog": "cliplens.catalog.db",
    "Catalog": "cliplens.catalog.db",
    "update_catalog": "cliplens.catalog.update",
    "UpdateStats": "cliplens.catalog.update",
    "VideoSampling": "cliplens.video",
    "Searchable": "cliplens.searchable",
    "Hit": "cliplens.searchable",
    "StoredModel": "cliplens.searchable",
    "parse_query": "cliplens.tasks.search",
    "search": "cliplens.tasks.search",
    "search_many": "cliplens.tasks.search",
    "similar": "cliplens.tasks.search",
    "duplicates": "cliplens.tasks.search",
    "DuplicateGroup": "cliplens.tasks.search",
    # zero-shot classification
    "classify": "cliplens.tasks.classify",
    "ClassifyResult": "cliplens.tasks.classify",
    "Prediction": "cliplens.tasks.classify",
    "zero_shot_weights": "cliplens.tasks.classify",
    "load_templates": "cliplens.tasks.classify",
    "embed_files": "cliplens.tasks.embed",
    "embed_images": "cliplens.tasks.embed",
    "Embedded": "cliplens.tasks.embed",
    # moderation
    "load_policy": "cliplens.tasks.policy",
    "Policy": "cliplens.tasks.policy",
    "build_moderator": "cliplens.tasks.moderate",
    "Moderator": "cliplens.tasks.moderate",
    "moderate": "cliplens.tasks.moderate",
    "labelled_examples": "cliplens.tasks.moderate",
    "calibrate": "cliplens.tasks.moderate",
    "Moderation": "cliplens.tasks.moderate",
    "Verdict": "cliplens.tasks.moderate",
    "calibrate_policy": "cliplens.tasks.moderate",
    "train_head": "cliplens.tasks.moderate",
    "save_with_head": "cliplens.tasks.moderate",
    "redact": "cliplens.tasks.moderate",
    # screening: corrupt files, quality, distortion type
    "screen": "cliplens.tasks.quality",
    "Screening": "cliplens.tasks.quality",
    "check_file": "cliplens.tasks.quality",
    "Integrity": "cliplens.tasks.quality",
    "build_screener": "cliplens.tasks.quality",
    "iqa_mode": "cliplens.tasks.quality",
    "train_probe": "cliplens.tasks.quality",
    "distort": "cliplens.corruptions",
    "corrupt": "cliplens.corruptions",
    # linear probes and k-shot curves
    "labelled_folder": "cliplens.tasks.probe",
    "fit_probe": "cliplens.tasks.probe",
    "LinearProbe": "cliplens.tasks.probe",
    "kshot": "cliplens.tasks.probe",
    "KShotPoint": "cliplens.tasks.probe",
    "kshot_report": "cliplens.tasks.probe",
    "embed_labelled_folder": "cliplens.tasks.probe",
    "fit_folder_probe": "cliplens.tasks.probe",
    # CLIPScore, RefCLIPScore, reranking
    "clip_score": "cliplens.tasks.score",
    "prefixed": "cliplens.tasks.score",
    "ref_clip_score": "cliplens.tasks.score",
    "rerank": "cliplens.tasks.score",
    "score_images": "cliplens.tasks.score",
    "rerank_images": "cliplens.tasks.score",
    # CLIP-guided generation
    "generate": "cliplens.generation.generate",
    "GenerateConfig": "cliplens.generation.config",
    "GenerateResult": "cliplens.generation.generate",
    "parse_prompts": "cliplens.generation.generate",
    "Prompt": "cliplens.generation.generate",
    "build_generator": "cliplens.generation.generate",
    "guide_model": "cliplens.generation.generate",
    # captioning (ClipCap)
    "read_pairs": "cliplens.train.data",
    "Pair": "cliplens.train.data",
    "embed_pairs": "cliplens.captioning.embedded",
    "EmbeddedPairs": "cliplens.captioning.embedded",
    "CaptionTrainConfig": "cliplens.captioning.train",
    "CaptionTrainResult": "cliplens.captioning.train",
    "ScratchLM": "cliplens.captioning.language_model",
    "train_captioner": "cliplens.captioning.train",
    "EncoderIdentity": "cliplens.captioning.model",
    "Captioner": "cliplens.captioning.model",
    "CaptionOptions": "cliplens.captioning.model",
    "load_captioner": "cliplens.captioning.model",
    "load_clipcap_checkpoint": "cliplens.captioning.reference",
    "caption": "cliplens.captioning.model",
    "evaluate_captioner": "cliplens.captioning.evaluate",
    "CaptionEvaluation": "cliplens.captioning.evaluate",
    "score_captions": "cliplens.captioning.metrics",
    "CaptionScores": "cliplens.captioning.metrics",
    # training CLIP, and corruption-robust image towers
    "ClipTrainConfig": "cliplens.train.clip",
    "ClipTrainResult": "cliplens.train.clip",
    "train_clip": "cliplens.train.clip",
    "clip_model_config": "cliplens.train.clip",
    "RobustConfig": "cliplens.train.robust",
    "RobustResult": "cliplens.train.robust",
    "train_robust": "cliplens.train.robust",
    "evaluate_robust": "cliplens.train.robust",
    "teacher_probe": "cliplens.train.robust",
    "RobustRow": "cliplens.train.robust",
    "evaluate_robust_run": "cliplens.train.robust",
    "load_teacher": "cliplens.train.robust",
    # datasets to try things on
    "write_photos": "cliplens.datasets.photos",
    "write_shapes": "cliplens.datasets.shapes",
    "write_distortions": "cliplens.datasets.distorted",
    "write_fashion_mnist": "cliplens.datasets.fashion_mnist",
    # datasets of any size: embed on Ray, then a faiss index
    "EmbedJob": "cliplens.distributed.embed",
    "embed_dataset": "cliplens.distributed.embed",
    "build_index": "cliplens.index.build",
    "update_index": "cliplens.index.build",
    "IndexReport": "cliplens.index.built",
    "import_shards": "cliplens.distributed.embed",
    "open_built_index": "cliplens.index.built",
    "BuiltIndex": "cliplens.index.built",
    # the HTTP service
    "create_app": "cliplens.server.app",
    "ServerSettings": "cliplens.server.service",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # looked up once
        return value
    raise AttributeError(f"module 'cliplens' has no attribute '{name}'")


def __dir__() -> list[str]:
    return __all__
