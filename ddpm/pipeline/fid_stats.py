"""The `fid_stats` stage: Inception pool statistics of the whole training split, the reference of every FID
the evaluate stage computes (cached by DVC across diffusion experiments)."""

from __future__ import annotations

from ddpm.config import Config
from ddpm.data.prepared import load_prepared
from ddpm.evaluation.fid import InceptionFeatures, inception_outputs, save_stats
from ddpm.evaluation.metrics import feature_statistics
from ddpm.pipeline.devices import resolve_device
from ddpm.pipeline.layout import Layout


def fid_stats_stage(cfg: Config, paths: Layout) -> dict:
    """Inception pool statistics of the whole training split (computed once; a DVC output).

    With `evaluate.fid: false` the file records that FID is disabled, so the pipeline's shape does not
    depend on the flag and no weights are needed.
    """
    if not cfg.evaluate.fid:
        save_stats(paths.fid_stats, None, None)
        return {"fid": "disabled (evaluate.fid: false)"}
    data = load_prepared(paths.prepared)
    device = resolve_device(cfg.train.device)
    extractor = InceptionFeatures(cfg.evaluate.inception_weights, device,
                                  allow_download=cfg.evaluate.download_inception)
    feats, _ = inception_outputs(extractor, data.train_images, batch_size=200)
    mu, sigma = feature_statistics(feats)
    save_stats(paths.fid_stats, mu, sigma)
    return {"fid_reference_images": int(len(feats))}
